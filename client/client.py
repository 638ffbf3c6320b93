"""A thin client of the isekai models over gRPC (tritonclient), usable as a library.

    client = IsekaiClient("localhost:8001")
    swap = client.swap(open("photo.jpg", "rb").read(), clicks=[(312, 240)], seed=7)
    open("out.png", "wb").write(swap.result)

    session = client.segment_session(image_bytes)      # click, look, click again: only SAM's decoder runs
    first = session.click((312, 240))
    second = session.click((40, 60), positive=False)   # sends the previous low_res_mask back

Several URLs (``"host-a:8001,host-b:8001"``, or ``dns:///isekai-headless:8001`` which resolves every address of a
headless Kubernetes Service) are used round-robin per request: gRPC keeps one connection per channel, so a Service's
connection-level balancing would pin one client to one pod.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from isekai.client import api

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

    @property
    def drawable(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class SegmentResult:
    mask: bytes  # PNG, original size
    score: float
    low_res_mask: np.ndarray  # float32 [1,1,256,256] logits: send back as mask_input


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


class IsekaiClient:
    """Calls ``isekai`` and ``isekai_segment``; round-robin over several servers; gRPC (default) or HTTP."""

    def __init__(self, url: str | Sequence[str] = "localhost:8001", *, protocol: str = "grpc", timeout_s: float = 600):
        if protocol == "grpc":
            import tritonclient.grpc as tc  # noqa: PLC0415
        elif protocol == "http":
            import tritonclient.http as tc  # noqa: PLC0415
        else:
            raise ValueError(f"protocol must be 'grpc' or 'http', not {protocol!r}")
        self._tc = tc
        self.protocol = protocol
        self.timeout_s = timeout_s
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
        client = self._client()
        request = [self._input(n, v) for n, v in inputs.items()]
        wanted = [self._tc.InferRequestedOutput(n) for n in outputs]
        if self.protocol == "grpc":
            return client.infer(model, request, outputs=wanted, client_timeout=self.timeout_s)
        return client.infer(model, request, outputs=wanted)

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

        ``upscale`` (2 or 4; 1 = off) makes ``result`` that many times the photo's width and height (Real-ESRGAN on
        the server); ``mask`` and ``background`` keep the photo's size.

        ``mask_input`` is what :meth:`segment` takes: with the same clicks and ``mask_input`` as a segment call, the
        swap uses exactly the mask that call returned (:meth:`SegmentSession.swap` does this for a session).
        """
        inputs = self._prompt_inputs(image, clicks, negatives, box)
        if mask_input is not None:
            inputs[api.MASK_INPUT] = np.asarray(mask_input, dtype=np.float32)
        for name, value, dtype in (
            (api.CHARACTER, character, np.object_),
            (api.PROMPT, prompt, np.object_),
            (api.STRENGTH, strength, np.float32),
            (api.STEPS, steps, np.int32),
            (api.GUIDANCE, guidance, np.float32),
            (api.SEED, seed, np.int64),
            (api.FORMAT, format, np.object_),
            (api.UPSCALE, upscale, np.int32),
        ):
            if value is not None:
                inputs[name] = np.array([value.encode() if isinstance(value, str) else value], dtype=dtype)
        out = self._infer(api.SWAP_MODEL, inputs, api.SWAP_OUTPUTS)
        return SwapResult(
            result=out.as_numpy(api.RESULT).reshape(-1)[0],
            mask=out.as_numpy(api.MASK).reshape(-1)[0],
            background=out.as_numpy(api.BACKGROUND).reshape(-1)[0],
            score=float(out.as_numpy(api.SCORE).reshape(-1)[0]),
        )

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
        return [CharacterInfo(**{f: entry.get(f) for f in CharacterInfo.__dataclass_fields__}) for entry in raw]

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
        self.last = self.client.segment(self.image, self.clicks, self.negatives, self.box, mask_input=previous)
        self.last_mask_input = previous
        return self.last

    def swap(self, **options) -> SwapResult:
        """Generate with the mask last shown: the same clicks, box and ``mask_input`` (options as in ``swap``)."""
        return self.client.swap(self.image, self.clicks, self.negatives, self.box,
                                mask_input=self.last_mask_input, **options)
