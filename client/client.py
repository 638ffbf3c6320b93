"""A thin client of the isekai models over gRPC (tritonclient), usable as a library.

    client = IsekaiClient("localhost:8001")
    swap = client.swap(open("photo.jpg", "rb").read(), clicks=[(312, 240)], seed=7)
    open("out.png", "wb").write(swap.result)

    with client.swap_stream(photo, clicks=[(312, 240)], seed=7) as stream:   # the same swap, with progress
        for event in stream:                          # SwapProgress(stage, progress, preview) ..., SwapResult
            print(event.stage, event.progress) if isinstance(event, SwapProgress) else save(event.result)

    session = client.segment_session(image_bytes)     # click, look, click again: only SAM's decoder runs
    first = session.click((312, 240))
    second = session.click((40, 60), positive=False)  # sends the previous low_res_mask back

Several URLs (``"host-a:8001,host-b:8001"``, or ``dns:///isekai-headless:8001`` which resolves every address
of a headless Kubernetes Service) are used round-robin per request: gRPC keeps one connection per channel, so
a Service's connection-level balancing would pin one client to one pod.
"""

from __future__ import annotations

import itertools
import json
import queue
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from isekai import constants as C
from isekai.client import api, retry

Point = tuple[float, float]


@dataclass(frozen=True)
class SwapResult:
    result: bytes  # encoded scene with the character (format as asked)
    mask: bytes  # PNG, the person mask at the original size
    background: bytes  # encoded scene without the person
    score: float  # predicted IoU of the chosen mask


@dataclass(frozen=True)
class CharacterInfo:
    """A character the server offers (the ``characters`` model's JSON)."""

    name: str
    kind: str  # prompt | lora | full
    prompt: str
    negative_prompt: str
    default: bool  # drawn when a request names no character
    bytes: int  # size of its files on the server
    revision: str
    source: str
    problem: str | None  # why it cannot be drawn (registered on another base model), or None
    # The steps and guidance a swap that leaves them out gets (the exported scheduler's: 25 and 7.5 for
    # DPM-Solver++, 4 and 1 after an LCM-LoRA export); None from servers older than this field.
    steps: int | None = None
    guidance: float | None = None

    @property
    def drawable(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class SegmentResult:
    mask: bytes  # PNG, original size
    score: float
    low_res_mask: np.ndarray  # float32 [1,1,256,256] logits: send back as mask_input


@dataclass(frozen=True)
class SwapProgress:
    """One progress response of ``isekai_stream``."""

    stage: str  # an isekai step's model name (preprocess, ..., diffusion, compose, finish) or "queued"
    progress: float  # 0..1, never decreasing within a swap
    preview: bytes | None = None  # a small PNG of the character being drawn (some diffusion steps)


def _swap_result(out) -> SwapResult:
    """The SWAP_OUTPUTS of an InferResult."""
    return SwapResult(
        result=out.as_numpy(api.RESULT).reshape(-1)[0],
        mask=out.as_numpy(api.MASK).reshape(-1)[0],
        background=out.as_numpy(api.BACKGROUND).reshape(-1)[0],
        score=float(out.as_numpy(api.SCORE).reshape(-1)[0]),
    )


# isekai_stream starts an error's message with its code's name: gRPC streams carry the message, not the code.
_STREAM_ERROR = re.compile(r"(INVALID_ARGUMENT|INTERNAL|CANCELLED|UNAVAILABLE): (.*)", re.DOTALL)


def _stream_error(error: Exception) -> Exception:
    """A stream's error with the status its message names (as a unary call's error would carry it)."""
    from tritonclient.utils import InferenceServerException  # noqa: PLC0415 - tritonclient's own error type

    match = _STREAM_ERROR.fullmatch(getattr(error, "message", lambda: "")() or "")
    if match is None or getattr(error, "status", lambda: None)() is not None:
        return error
    return InferenceServerException(msg=match.group(2), status=f"StatusCode.{match.group(1)}")


class SwapStream:
    """An ``isekai_stream`` request on its own gRPC stream: iterate it for :class:`SwapProgress` events, then
    one :class:`SwapResult`.

    Errors the server sends (a bad input: INVALID_ARGUMENT naming it) are raised from the iteration as
    ``tritonclient.utils.InferenceServerException``. :meth:`cancel` stops the swap on the server (its UNet
    loop ends before the next step) and ends the iteration without a result; so does leaving a ``with`` block
    early.
    """

    _END = object()

    def __init__(self, tc, url: str, inputs: list, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.cancelled = False
        self.finished = False
        self._events: queue.Queue = queue.Queue()
        self._client = tc.InferenceServerClient(url)  # one stream per client: a channel of its own
        self._closed = False
        self._close_lock = threading.Lock()
        try:
            self._client.start_stream(callback=self._on_response, stream_timeout=timeout_s)
            self._client.async_stream_infer(api.STREAM_MODEL, inputs, enable_empty_final_response=True)
        except BaseException:
            self._close(cancel=True)
            raise

    def _on_response(self, result, error) -> None:
        self._events.put((result, error))

    def __iter__(self) -> Iterator[SwapProgress | SwapResult]:
        while not self.finished:
            try:
                item = self._events.get(timeout=self.timeout_s)
            except queue.Empty:
                self._close(cancel=True)
                raise TimeoutError(f"{api.STREAM_MODEL}: no response for {self.timeout_s:g} s") from None
            if item is self._END:
                return
            result, error = item
            if error is not None:
                self.finished = True
                self._close(cancel=False)
                if self.cancelled:
                    return
                raise _stream_error(error)
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            names = {o.name for o in response.outputs}
            if api.RESULT in names:
                self.finished = True
                self._close(cancel=False)
                yield _swap_result(result)
                return
            if api.STAGE in names:
                preview = result.as_numpy(api.PREVIEW).reshape(-1)[0] if api.PREVIEW in names else None
                yield SwapProgress(
                    stage=result.as_numpy(api.STAGE).reshape(-1)[0].decode("utf-8", "replace"),
                    progress=float(result.as_numpy(api.PROGRESS).reshape(-1)[0]),
                    preview=preview,
                )
            if final:  # the final flag without the outputs: only after a cancel
                self.finished = True
                self._close(cancel=False)
                return

    def result(self) -> SwapResult | None:
        """Run the stream to its end and return the result (None if cancelled)."""
        last = None
        for event in self:
            last = event
        return last if isinstance(last, SwapResult) else None

    def cancel(self) -> None:
        """Stop the swap on the server; the iteration ends without a result. Safe from any thread."""
        if not self.finished:
            self.cancelled = True
        self._close(cancel=True)
        self._events.put(self._END)

    def _close(self, cancel: bool) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._client.stop_stream(cancel_requests=cancel)
        finally:
            self._client.close()

    def __enter__(self) -> SwapStream:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


def resolve_urls(url: str | Sequence[str]) -> list[str]:
    """Expand ``"a:8001,b:8001"`` and ``dns:///name:port`` (every A/AAAA record) into host:port strings."""
    urls = [u.strip() for u in url.split(",")] if isinstance(url, str) else list(url)
    resolved: list[str] = []
    for u in urls:
        if u.startswith("dns:///"):
            host, _, port = u[len("dns:///") :].rpartition(":")
            if not host or not port:
                raise ValueError(f"url {u!r}: expected dns:///HOST:PORT")
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            addrs = sorted({info[4][0] for info in infos})
            resolved.extend(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addrs)
        elif u:
            resolved.append(u)
    if not resolved:
        raise ValueError(f"no server address in {url!r}")
    return resolved


def _points_labels(clicks: Iterable[Point], negatives: Iterable[Point]) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = list(clicks), list(negatives)
    points = np.array(pos + neg, dtype=np.float32).reshape(-1, 2)
    labels = np.array([1] * len(pos) + [0] * len(neg), dtype=np.int32)
    return points, labels


def _server_busy(model: str, attempts: int, elapsed_s: float, last: Exception) -> Exception:
    """The error a call that was refused as busy every time ends with: still UNAVAILABLE, and it says so."""
    from tritonclient.utils import InferenceServerException  # noqa: PLC0415 - the protocol modules import it too

    class ServerBusy(InferenceServerException):
        pass

    return ServerBusy(f"{model}: the server is busy: refused {attempts} tries over {elapsed_s:.1f} s; retry "
                      f"later or add servers (last answer: {last.message()})", status=last.status())


class IsekaiClient:
    """Calls ``isekai`` and ``isekai_segment``; round-robin over several servers; gRPC (default) or HTTP.

    ``timeout_s`` bounds each call, retries included; the server is told it too (Triton's ``timeout`` request
    parameter), so its queues drop a request that waited that long and its model-to-model calls give up then,
    with an error that names the stage. A call the server refused as busy (a full queue: UNAVAILABLE), could
    not be reached, or was draining is sent again, to the next server when there are several, up to
    ``attempts`` tries, waiting 1, 2, 4, ... s between them (:mod:`isekai.client.retry`); every call is
    idempotent (the same seed gives the same bytes). Refused every time, it raises an
    ``InferenceServerException`` whose status is still UNAVAILABLE and whose message says the server is busy.
    """

    def __init__(self, url: str | Sequence[str] = "localhost:8001", *, protocol: str = "grpc",
                 timeout_s: float = 600, attempts: int = C.RETRY_ATTEMPTS):
        if protocol == "grpc":
            import tritonclient.grpc as tc  # noqa: PLC0415
        elif protocol == "http":
            import tritonclient.http as tc  # noqa: PLC0415
        else:
            raise ValueError(f"protocol must be 'grpc' or 'http', not {protocol!r}")
        if attempts < 1:
            raise ValueError(f"attempts should be >= 1 but is {attempts}")
        self._tc = tc
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.urls = resolve_urls(url)
        kwargs = {} if protocol == "grpc" else {"network_timeout": timeout_s, "connection_timeout": timeout_s}
        self._clients = [tc.InferenceServerClient(u, **kwargs) for u in self.urls]
        self._next = itertools.cycle(range(len(self._clients)))
        self._lock = threading.Lock()

    def _client(self):
        with self._lock:
            return self._clients[next(self._next)]

    def _input(self, name: str, value: np.ndarray):
        t = self._tc.InferInput(name, list(value.shape), api.DTYPES[name])
        t.set_data_from_numpy(value)
        return t

    def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]):
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415 - as in __init__

        request = [self._input(n, v) for n, v in inputs.items()]
        wanted = [self._tc.InferRequestedOutput(n) for n in outputs]
        started = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            remaining = self.timeout_s - (time.monotonic() - started)
            try:
                return self._infer_once(model, request, wanted, remaining)
            except InferenceServerException as err:
                status, message = err.status(), err.message() or ""
                if not retry.retryable(status, message):
                    raise
                delay = retry.backoff(attempt)
                elapsed = time.monotonic() - started
                if attempt == self.attempts or elapsed + delay >= self.timeout_s:
                    if retry.is_busy(status, message):
                        raise _server_busy(model, attempt, elapsed, err) from err
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _infer_once(self, model: str, request: list, wanted: list, timeout_s: float):
        # The server gets the same deadline in microseconds; the client's own one comes a moment later, so
        # that the server's answer (which names the stage that ran out of time) arrives first.
        server_us = max(1, int(timeout_s * 1e6))
        client = self._client()
        if self.protocol == "grpc":
            return client.infer(model, request, outputs=wanted, timeout=server_us,
                                client_timeout=timeout_s + C.CLIENT_DEADLINE_MARGIN_S)
        return client.infer(model, request, outputs=wanted, timeout=server_us)

    @staticmethod
    def _prompt_inputs(
        image: bytes, clicks: Iterable[Point], negatives: Iterable[Point], box: Sequence[float] | None
    ) -> dict[str, np.ndarray]:
        points, labels = _points_labels(clicks, negatives)
        inputs = {
            api.IMAGE: np.array([image], dtype=np.object_),
            api.POINTS: points,
            api.LABELS: labels,
        }
        if box is not None:
            inputs[api.BOX] = np.asarray(box, dtype=np.float32).reshape(4)
        return inputs

    def _swap_inputs(
        self,
        image: bytes,
        clicks: Iterable[Point],
        negatives: Iterable[Point],
        box: Sequence[float] | None,
        mask_input: np.ndarray | None,
        options: dict[str, object],
    ) -> dict[str, np.ndarray]:
        """The tensors of an isekai (or isekai_stream) request; options left as None are left out."""
        inputs = self._prompt_inputs(image, clicks, negatives, box)
        if mask_input is not None:
            inputs[api.MASK_INPUT] = np.asarray(mask_input, dtype=np.float32)
        for name, dtype in (
            (api.CHARACTER, np.object_),
            (api.PROMPT, np.object_),
            (api.STRENGTH, np.float32),
            (api.STEPS, np.int32),
            (api.GUIDANCE, np.float32),
            (api.SEED, np.int64),
            (api.FORMAT, np.object_),
            (api.UPSCALE, np.int32),
        ):
            value = options.get(name)
            if value is not None:
                inputs[name] = np.array([value.encode() if isinstance(value, str) else value], dtype=dtype)
        return inputs

    def swap(
        self,
        image: bytes,
        clicks: Iterable[Point] = (),
        negatives: Iterable[Point] = (),
        box: Sequence[float] | None = None,
        *,
        mask_input: np.ndarray | None = None,
        character: str | None = None,
        prompt: str | None = None,
        strength: float | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        format: str | None = None,  # noqa: A002 - the API's own name
        upscale: int | None = None,
    ) -> SwapResult:
        """The whole swap; options left as None take the server's documented defaults.

        ``upscale`` (2 or 4; 1 = off) makes ``result`` that many times the photo's width and height
        (Real-ESRGAN on the server); ``mask`` and ``background`` keep the photo's size.

        ``mask_input`` is what :meth:`segment` takes: with the same clicks and ``mask_input`` as a segment
        call, the swap uses exactly the mask that call returned (:meth:`SegmentSession.swap` does this for a
        session).
        """
        options = {api.CHARACTER: character, api.PROMPT: prompt, api.STRENGTH: strength, api.STEPS: steps,
                   api.GUIDANCE: guidance, api.SEED: seed, api.FORMAT: format, api.UPSCALE: upscale}
        inputs = self._swap_inputs(image, clicks, negatives, box, mask_input, options)
        out = self._infer(api.SWAP_MODEL, inputs, api.SWAP_OUTPUTS)
        return _swap_result(out)

    def swap_stream(
        self,
        image: bytes,
        clicks: Iterable[Point] = (),
        negatives: Iterable[Point] = (),
        box: Sequence[float] | None = None,
        *,
        mask_input: np.ndarray | None = None,
        character: str | None = None,
        prompt: str | None = None,
        strength: float | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        format: str | None = None,  # noqa: A002 - the API's own name
        upscale: int | None = None,
    ) -> SwapStream:
        """The swap of :meth:`swap` (same arguments, same bytes) through ``isekai_stream``, with progress.

        Iterate the returned :class:`SwapStream`: :class:`SwapProgress` events (stage, progress 0..1,
        sometimes a preview PNG), then one :class:`SwapResult`. ``stream.cancel()`` (from any thread) or
        leaving its ``with`` block early stops the swap on the server. gRPC only: plain HTTP cannot carry
        decoupled responses.
        """
        if self.protocol != "grpc":
            raise ValueError(
                "swap_stream needs protocol='grpc' (HTTP cannot carry isekai_stream's responses)"
            )
        options = {api.CHARACTER: character, api.PROMPT: prompt, api.STRENGTH: strength, api.STEPS: steps,
                   api.GUIDANCE: guidance, api.SEED: seed, api.FORMAT: format, api.UPSCALE: upscale}
        inputs = self._swap_inputs(image, clicks, negatives, box, mask_input, options)
        with self._lock:
            url = self.urls[next(self._next)]
        return SwapStream(self._tc, url, [self._input(n, v) for n, v in inputs.items()], self.timeout_s)

    def segment(
        self,
        image: bytes,
        clicks: Iterable[Point] = (),
        negatives: Iterable[Point] = (),
        box: Sequence[float] | None = None,
        mask_input: np.ndarray | None = None,
    ) -> SegmentResult:
        """The person mask only (SAM); ``mask_input`` is a previous answer's ``low_res_mask``."""
        inputs = self._prompt_inputs(image, clicks, negatives, box)
        if mask_input is not None:
            inputs[api.MASK_INPUT] = np.asarray(mask_input, dtype=np.float32)
        out = self._infer(api.SEGMENT_MODEL, inputs, api.SEGMENT_OUTPUTS)
        return SegmentResult(
            mask=out.as_numpy(api.MASK).reshape(-1)[0],
            score=float(out.as_numpy(api.SCORE).reshape(-1)[0]),
            low_res_mask=out.as_numpy(api.LOW_RES_MASK),
        )

    def characters(self, name: str | None = None) -> list[CharacterInfo]:
        """The server's registered characters (all, or only ``name``); ``default`` marks the default one."""
        inputs = {} if name is None else {api.NAME: np.array([name.encode()], dtype=np.object_)}
        out = self._infer(api.CHARACTERS_MODEL, inputs, api.CHARACTERS_OUTPUTS)
        raw = json.loads(out.as_numpy(api.CHARACTERS).reshape(-1)[0])
        return [
            CharacterInfo(**{f: entry.get(f) for f in CharacterInfo.__dataclass_fields__}) for entry in raw
        ]

    def segment_session(self, image: bytes) -> SegmentSession:
        return SegmentSession(self, image)

    def close(self) -> None:
        for c in self._clients:
            c.close()


class SegmentSession:
    """The click-look-click loop on one image: accumulates clicks and feeds ``low_res_mask`` back."""

    def __init__(self, client: IsekaiClient, image: bytes) -> None:
        self.client = client
        self.image = image
        self.clicks: list[Point] = []
        self.negatives: list[Point] = []
        self.box: Sequence[float] | None = None
        self.last: SegmentResult | None = None
        self.last_mask_input: np.ndarray | None = None  # what produced ``last``: a swap repeats it

    def click(self, point: Point, positive: bool = True) -> SegmentResult:
        (self.clicks if positive else self.negatives).append(point)
        return self._ask()

    def set_box(self, box: Sequence[float]) -> SegmentResult:
        self.box = box
        return self._ask()

    def _ask(self) -> SegmentResult:
        previous = None if self.last is None else self.last.low_res_mask
        self.last = self.client.segment(self.image, self.clicks, self.negatives, self.box,
                                        mask_input=previous)
        self.last_mask_input = previous
        return self.last

    def swap(self, **options) -> SwapResult:
        """Generate with the mask last shown: the same clicks, box and ``mask_input`` (options as in
        ``swap``)."""
        return self.client.swap(self.image, self.clicks, self.negatives, self.box,
                                mask_input=self.last_mask_input, **options)

    def swap_stream(self, **options) -> SwapStream:
        """:meth:`swap` through ``isekai_stream``: progress events, then the same :class:`SwapResult`."""
        return self.client.swap_stream(self.image, self.clicks, self.negatives, self.box,
                                       mask_input=self.last_mask_input, **options)
