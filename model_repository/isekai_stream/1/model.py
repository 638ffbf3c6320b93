"""isekai_stream: the isekai swap with progress, for gRPC streaming callers (decoupled).

Per request: a ``queued`` response at once, then the isekai ensemble's steps (read from its config,
:class:`EnsemblePlan`) run in a worker thread, each reported when it starts and ends; the diffusion step runs
here (:class:`DiffusionStep`, the code the ``diffusion`` model runs) and reports every UNet step, with a
preview every few. The last data response holds isekai's outputs and the final flag. A caller's bad input gets
one error response (INVALID_ARGUMENT, in the words isekai uses) with the final flag: checked before anything
is sent by preprocess's validators (all but the pixels' decode), else by preprocess itself. A cancelled
request (the client cancelled or went away) stops before its next step or UNet call and is answered CANCELLED.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from isekai import constants as C
from isekai.client import api
from isekai.ensemble.admission import Busy
from isekai.ensemble.finish import require_upscale_graph
from isekai.ensemble.preview import is_preview_step, preview_png
from isekai.ensemble.requests import check_default_steps, precheck_swap
from isekai.serving import triton
from isekai.serving.diffusion_step import OUTPUT as DIFFUSION_OUTPUT
from isekai.serving.diffusion_step import DiffusionStep
from isekai.serving.ensemble_steps import EnsemblePlan, Step, StreamProgress, run_plan

log = logging.getLogger("isekai")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Cancelled(Exception):
    """The caller cancelled the request (or its stream went away)."""


class Responder:
    """One request's response sender: sends one at a time from any thread, checks cancellation."""

    def __init__(self, request) -> None:
        self.sender = request.get_response_sender()
        self.lock = threading.Lock()
        self.closed = False

    def cancelled(self) -> bool:
        return self.sender.is_cancelled()

    def check(self) -> None:
        if self.cancelled():
            raise Cancelled()

    def send(self, stage: str, progress: float, extra: list | None = None, final: bool = False) -> None:
        tensors = [
            triton.bytes_tensor("stage", stage.encode()),
            triton.tensor("progress", np.array([progress], dtype=np.float32)),
            *(extra or []),
        ]
        with self.lock:
            if not self.closed:
                response = pb_utils.InferenceResponse(output_tensors=tensors)
                self.sender.send(response, flags=FINAL if final else 0)
                self.closed = final

    def fail(self, err: Exception) -> None:
        """One error response with the final flag. gRPC streams carry an error's message but not its code, so
        the message starts with the code's name (``INVALID_ARGUMENT: ...``); IsekaiClient turns it back into a
        status."""
        if isinstance(err, Cancelled):
            code, message = pb_utils.TritonError.CANCELLED, "the request was cancelled"
        elif isinstance(err, Busy) or any(busy in str(err) for busy in C.BUSY_MESSAGES):
            code, message = pb_utils.TritonError.UNAVAILABLE, str(err)  # a full queue here or in a step
        elif isinstance(err, ValueError) or (isinstance(err, triton.ModelCallError) and err.invalid_argument):
            # The caller's fault, in the words of the step that refused it (the message isekai gives).
            code, message = pb_utils.TritonError.INVALID_ARG, getattr(err, "detail", str(err))
        else:
            code, message = pb_utils.TritonError.INTERNAL, str(err)
        name = {pb_utils.TritonError.CANCELLED: "CANCELLED", pb_utils.TritonError.UNAVAILABLE: "UNAVAILABLE",
                pb_utils.TritonError.INVALID_ARG: "INVALID_ARGUMENT"}
        text = f"{name.get(code, 'INTERNAL')}: {message}"
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(text, code))
        with self.lock:
            if not self.closed:
                self.sender.send(response, flags=FINAL)
                self.closed = True


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        # Only the scheduler arithmetic runs here; the heavy math is in the ONNX models' own thread pools.
        torch.set_num_threads(1)
        self.name = args["model_name"]
        config = triton.load_config(args)
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise ValueError(f"{self.name} must be decoupled: model_transaction_policy {{ decoupled: true }}")
        params = triton.parameters(config)
        self.repository = repository = Path(args["model_repository"]).parent
        ensemble = params.get("ensemble", C.ENSEMBLE_MODEL)
        self.plan = EnsemblePlan.load(repository / ensemble / "config.pbtxt")
        inputs = [t["name"] for t in config["input"]]
        if inputs != list(self.plan.inputs):
            raise ValueError(f"{self.name} inputs {inputs} are not {ensemble}'s {list(self.plan.inputs)}")
        self.diffusion = DiffusionStep(repository)
        workers = int(params.get("max_concurrent_swaps", C.STREAM_MAX_CONCURRENT))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=self.name)
        # Load shedding: a swap beyond those running and those waiting is refused at once with UNAVAILABLE in
        # Triton's words for a full queue, which clients read as "busy, retry later".
        self.capacity = workers + int(params.get("max_waiting_swaps", C.STREAM_MAX_WAITING))
        self.accepted = 0
        self.accepted_lock = threading.Lock()

    def execute(self, requests: list) -> None:
        for request in requests:
            responder = Responder(request)
            try:
                inputs = {name: triton.optional_input(request, name) for name in self.plan.inputs}
                self._precheck(inputs)  # a bad request: one error, nothing before it
                self._admit()
            except Exception as err:  # noqa: BLE001 - answered, never raised into the backend
                responder.fail(err)
                continue
            try:
                responder.send(C.STREAM_STAGE_QUEUED, 0.0)
                self.pool.submit(self._swap, {k: v for k, v in inputs.items() if v is not None}, responder)
            except Exception as err:  # noqa: BLE001 - the caller left already; nothing runs for it
                self._release()
                log.warning("%s: request dropped before it started: %s", self.name, err)
        return None

    def _admit(self) -> None:
        with self.accepted_lock:
            if self.accepted >= self.capacity:
                raise Busy(f"{C.BUSY_MESSAGES[0]}: {self.name} holds {self.capacity} swaps, running "
                           f"and waiting; retry later")
            self.accepted += 1

    def _release(self) -> None:
        with self.accepted_lock:
            self.accepted -= 1

    def _precheck(self, inputs: dict[str, np.ndarray | None]) -> None:
        """What preprocess checks before any model runs, less the pixels' decode (same validators, same
        words)."""
        for name in (api.IMAGE, api.POINTS, api.LABELS):
            if inputs.get(name) is None:
                raise ValueError(f"input '{name}' is required")
        options = precheck_swap(**{k: v for k, v in inputs.items() if k in api.SWAP_INPUTS})
        self.diffusion.characters.get(options.character)
        check_default_steps(options, self.diffusion.characters.config.sampling_defaults[0])
        require_upscale_graph(options.upscale, self.repository)

    def finalize(self) -> None:
        self.pool.shutdown(wait=True)  # requests in flight finish (or see their cancellation) first

    def _swap(self, inputs: dict[str, np.ndarray], responder: Responder) -> None:
        try:
            responder.check()
            progress = StreamProgress(self.plan, _denoising_estimate(inputs))

            def call(step: Step, args: dict) -> dict:
                responder.check()
                if step.model == C.DIFFUSION_MODEL:
                    return {DIFFUSION_OUTPUT: self._diffuse(args, responder, progress)}
                return triton.call(step.model, args, list(step.outputs))

            outputs = run_plan(
                self.plan, inputs, call,
                on_start=lambda step: responder.send(step.model, progress.current()),
                on_end=lambda step: responder.send(step.model, progress.step_done(step.model)),
            )
            tensors = [triton.tensor(name, value) for name, value in outputs.items()]
            responder.send(C.STREAM_STAGE_DONE, 1.0, tensors, final=True)
        except Exception as err:
            if not isinstance(err, ValueError | triton.ModelCallError | Cancelled | Busy):
                log.exception("%s: request failed", self.name)
            try:
                responder.fail(err)
            except Exception:  # noqa: BLE001 - the caller is gone; nothing is left to tell
                log.warning("%s: could not send the error response: %s", self.name, err)
        finally:
            self._release()

    def _diffuse(self, args: dict, responder: Responder, progress: StreamProgress) -> np.ndarray:
        preview: list = []

        def step_latents(step: int, total: int, latents: np.ndarray) -> None:
            if is_preview_step(step, total):
                preview.append(triton.bytes_tensor("preview", preview_png(latents)))

        def on_step(step: int, total: int) -> None:
            fraction = progress.denoised_to(step, total)
            responder.send(C.DIFFUSION_MODEL, fraction, preview[-1:])
            preview.clear()
            responder.check()  # between two UNet calls: a cancelled request stops here

        return self.diffusion.run(args, progress=on_step, step_latents=step_latents)


def _denoising_estimate(inputs: dict[str, np.ndarray]) -> int:
    """UNet steps the request will run, from its options (the loop says the exact number when it starts)."""
    def value(name: str, default: float) -> float:
        array = inputs.get(name)
        return default if array is None or array.size != 1 else float(array.reshape(-1)[0])

    steps = value("steps", C.DEFAULT_STEPS) or C.DEFAULT_STEPS
    return int(steps * value("strength", C.DEFAULT_STRENGTH))
