"""The default profile's ONNX models: onnxruntime inside a Python-backend model, on the ``model.onnx`` beside
it.

Any machine without a GPU or a container can serve the exported graphs this way; the ``gpu`` profile serves
the very same files with onnxruntime's CUDA provider (``parameters { key: "execution_provider" ... }``) or
Triton's own onnxruntime/tensorrt backends, and the ``tensorrt`` profile's unet and text_encoder run TensorRT
plans here (``runtime: tensorrt``, :mod:`isekai.serving.trt_session`). Each
``model_repository/<model>/1/model.py`` of an ONNX model is this class and nothing else.

With ``max_batch_size > 0`` and dynamic batching, Triton hands ``execute`` several requests at once; the
Python backend does not concatenate them, so this does: requests whose non-batch shapes agree, and that name
the same character, run as one onnxruntime call (the UNet's guidance pairs of concurrent requests become one
batch-4 call), then the outputs are split back. Models without batching run each request alone.

A model whose config declares the optional ``character`` input (``unet``, ``text_encoder``) runs each request
with the weights its character brings (:mod:`isekai.serving.character_weights`): the base graph with a LoRA
adapter active, or the character's own graph. Requests of different characters never share a run.

Errors: a request whose inputs are wrong fails alone with INVALID_ARGUMENT, and so does one whose feed
onnxruntime itself refuses (its ``InvalidArgument``: a shape the config allows and the graph does not);
onnxruntime failing to run (out of memory, a kernel error) is the server's fault: INTERNAL naming the model,
logged with the request ids (:mod:`isekai.serving.ort_errors`). A joined run that fails is run again request
by request, so one request's failure is not the others'.

The graph's identity (:func:`isekai.ensemble.cache.graph_identity`, taken before it is read) is kept: a
request naming the identity it expects in its :data:`~isekai.constants.GRAPH_PARAMETER` parameter is refused
(UNAVAILABLE, :data:`~isekai.constants.GRAPH_MISMATCH`) when this instance serves another graph, i.e. the
graph was re-exported and not yet reloaded. preprocess keys SAM embeddings by that identity.

``parameters { key: "nice" ... }``: the niceness (0..19) this stub's threads run at. sam_encoder sets it, so
that a new photo's encode, which takes every core for seconds, leaves the CPU to the clicks on cached photos
first.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from isekai import constants as C
from isekai.ensemble.cache import graph_identity
from isekai.ensemble.characters import CharacterChanged, CharacterStore
from isekai.serving import metrics, triton
from isekai.serving.character_weights import CharacterWeights
from isekai.serving.ort_errors import ModelRunError, run_error
from isekai.serving.ort_options import providers, session_options

log = logging.getLogger("isekai")

# How a model's graph runs: onnxruntime on model.onnx (CPU, or CUDA with execution_provider), or the TensorRT
# plan beside it (the tensorrt profile's models that pick a character's plan per request).
RUNTIMES = ("onnxruntime", "tensorrt")


class TritonPythonModel:
    """Serve ``<model>/1/model.onnx`` with onnxruntime (CPU, or the provider the config names)."""

    def initialize(self, args: dict[str, str]) -> None:
        self.config = triton.load_config(args)
        self.name = args["model_name"]
        self.params = triton.parameters(self.config)
        self.batched = self.config.get("max_batch_size", 0) > 0
        self.device_id = int(args.get("model_instance_device_id", "0") or 0)
        self.runtime = self.params.get("runtime", "onnxruntime")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"{self.name}: parameter runtime should be one of {RUNTIMES} but is "
                             f"{self.runtime!r}")
        filename = C.PLAN_FILENAME if self.runtime == "tensorrt" else C.ONNX_FILENAME
        path = Path(args["model_repository"]) / args["model_version"] / filename
        if not path.exists():
            how = "isekai export tensorrt" if self.runtime == "tensorrt" else "isekai export ..."
            raise FileNotFoundError(
                f"{self.name}: {path} does not exist; make it first ({how} --repository "
                f"{Path(args['model_repository']).parent})"
            )
        # before reading it: a graph replaced meanwhile never matches
        self.graph = graph_identity(path.parent)
        self.session = self._open(path)
        # Graph inputs without a default; LoRA slots (inputs with an initializer) are set by adapters only.
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.dtypes = {
            cfg["name"]: pb_utils.triton_string_to_numpy(cfg["data_type"]) for cfg in self.config["input"]
        }
        self.characters: CharacterWeights | None = None
        self.metrics = None
        if C.SD_IN_CHARACTER in self.dtypes:
            self.metrics = metrics.character_weights_metrics(self.name)
            self.characters = CharacterWeights(
                CharacterStore(Path(args["model_repository"]).parent), self.name, self.session, self._open,
                adapter_budget=int(self.params.get("character_adapter_bytes", C.CHARACTER_ADAPTER_BYTES)),
                graph_budget=int(self.params.get("character_graph_bytes", C.CHARACTER_GRAPH_BYTES)),
                plans=self.runtime == "tensorrt",
            )
        if "nice" in self.params:
            _renice(int(self.params["nice"]))

    def _open(self, path: Path):
        if self.runtime == "tensorrt":
            from isekai.serving.trt_session import TrtSession  # noqa: PLC0415 - GPU images only

            return TrtSession(path, self.device_id)
        import onnxruntime as ort  # noqa: PLC0415

        return ort.InferenceSession(str(path), session_options(self.params),
                                    providers=providers(self.params, self.device_id))

    def _feed(self, request) -> dict[str, np.ndarray]:
        feed = {}
        for name, meta in self.inputs.items():
            value = triton.required_input(request, name).astype(self.dtypes[name], copy=False)
            # A per-item scalar such as the UNet's timestep travels as [B,1] when batched; the graph wants
            # [B].
            if len(meta.shape) == value.ndim - 1 and value.shape[-1] == 1:
                value = value.reshape(value.shape[:-1])
            feed[name] = value
        return feed

    def _character(self, request) -> str:
        """The request's character key (``""``: the base); every row of a batched request names the same
        one."""
        if self.characters is None:
            return ""
        value = triton.optional_input(request, C.SD_IN_CHARACTER)
        if value is None or value.size == 0:
            return ""
        keys = {
            (v if isinstance(v, bytes) else bytes(v)).decode("utf-8", "replace") for v in value.reshape(-1)
        }
        if len(keys) != 1:
            raise ValueError(f"input '{C.SD_IN_CHARACTER}' must name one character per request, got "
                             f"{sorted(keys)}")
        return keys.pop()

    def _check_graph(self, request) -> None:
        """Refuse a request that expects another graph than this instance serves (see the module
        docstring)."""
        raw = request.parameters() if hasattr(request, "parameters") else ""
        if not raw or C.GRAPH_PARAMETER not in raw:
            return
        expected = json.loads(raw).get(C.GRAPH_PARAMETER)
        if expected and expected != self.graph:
            raise GraphRefused(f"{self.name} {C.GRAPH_MISMATCH}: it loaded graph {self.graph or '?'}, the "
                               f"caller expects {expected} (re-exported and not reloaded yet)")

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = defaultdict(list)
        for i, request in enumerate(requests):
            try:
                self._check_graph(request)
            except GraphRefused as err:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(err), pb_utils.TritonError.UNAVAILABLE))
                continue
            try:
                feed = self._feed(request)
                character = self._character(request)
            except Exception as err:  # noqa: BLE001 - this request alone fails
                responses[i] = triton.error_response(err)
                continue
            if self.batched:
                key = (character, tuple((n, v.shape[1:], v.dtype.str) for n, v in feed.items()))
            else:
                key = (character, i)  # a model without batching never joins requests
            groups[key].append((i, feed))
        for (character, _), members in groups.items():
            self._run_group(character, members, requests, responses)
        if self.metrics is not None:
            self.metrics.update(self.characters.stats())
        return responses

    def _run_group(self, character: str, members: list[tuple[int, dict[str, np.ndarray]]], requests: list,
                   responses: list) -> None:
        try:
            loaded = self.characters.get(character) if self.characters is not None else None
        except CharacterChanged as err:
            self._fail(members, requests, responses, err, "the character's weights")
            return
        except (ValueError, OSError) as err:
            self._fail(members, requests, responses, ValueError(f"{self.name}: {err}"), "")
            return
        session = self.session if loaded is None else loaded.session
        run_options = None if loaded is None else loaded.run_options
        if len(members) == 1:
            batch = members[0][1]
        else:
            batch = {n: np.concatenate([f[n] for _, f in members]) for n in self.inputs}
        try:
            outputs = session.run(self.output_names, batch, run_options)
        except Exception as err:  # noqa: BLE001 - classified below: the caller's input or the server's failure
            if len(members) > 1:  # one request's failure must not be the others': run each alone
                for member in members:
                    self._run_group(character, [member], requests, responses)
                return
            failure = run_error(self.name, err)
            self._fail(members, requests, responses, failure,
                       "run" if isinstance(failure, ModelRunError) else "")
            return
        offset = 0
        for i, feed in members:
            size = next(iter(feed.values())).shape[0] if len(members) > 1 else None
            parts = outputs if size is None else [o[offset : offset + size] for o in outputs]
            offset += size or 0
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[triton.tensor(n, p) for n, p in zip(self.output_names, parts, strict=True)]
            )

    def _fail(self, members, requests, responses, err: Exception, what: str) -> None:
        """Answer every request of a group with ``err``; a server-side failure is logged with the request
        ids."""
        if what:
            ids = [requests[i].request_id() or f"#{i}" for i, _ in members]
            log.error("%s: %s failed for requests %s: %s", self.name, what, ids, err)
        for i, _ in members:
            responses[i] = triton.error_response(err)

    def finalize(self) -> None:
        self.session = None
        self.characters = None


class GraphRefused(RuntimeError):
    """The request expects another graph than this instance loaded."""


def _renice(nice: int) -> None:
    """Run every thread of this process (onnxruntime's pool included) at niceness ``nice``.

    Linux keeps a niceness per thread and new threads inherit their creator's, so the threads that exist now
    are set one by one; raising it needs no privilege.
    """
    if not 0 <= nice <= 19:
        raise ValueError(f"parameter nice should be in [0, 19] but is {nice}")
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except (ProcessLookupError, PermissionError) as err:
            log.warning("could not renice thread %s: %s", tid, err)
