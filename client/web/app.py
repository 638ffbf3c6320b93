"""The page's server: one static page and a small JSON API in front of Triton, over gRPC with tritonclient.

It holds no model (it could run on another machine than Triton): a click is one ``isekai_segment`` call,
Generate is one ``isekai_stream`` call whose progress is passed on to the browser as it comes (NDJSON), and
the characters come from ``isekai_characters``. What it keeps per visitor is in
:mod:`isekai.client.web.sessions`.

API (all under ``/api``; errors are ``{"error": "a readable sentence"}`` with a 4xx/5xx status, never a
trace):

| call | body | answer |
| --- | --- | --- |
| ``GET config`` | | characters, the option limits, sample names, the server's address |
| ``POST session`` | | ``{"session"}``: an id for one visitor's tab |
| ``POST s/ID/photo`` | the file's bytes | ``{"width", "height", "name"}`` (decoded as Triton will) |
| ``POST s/ID/sample/NAME`` | | the same, for a sample photo |
| ``GET s/ID/photo.png`` | | the photo as the clicks see it (EXIF rotation applied) |
| ``POST s/ID/click`` | ``{"x", "y", "positive"}`` | ``{"mask": base64 PNG, "score", "ms"}`` |
| ``POST s/ID/box`` | ``{"box": [x0, y0, x1, y1]}`` | the same |
| ``POST s/ID/clear`` | | ``{}``: the clicks and box forgotten |
| ``POST s/ID/generate`` | ``{"character", "steps", "strength", "seed", "upscale"}`` | NDJSON lines (below) |
| ``POST s/ID/cancel`` | | ``{}``: the running Generate stopped on the server |
| ``GET s/ID/result.png`` | | the result (``?download=1``: as an attachment) |
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from isekai import constants as C
from isekai.client import retry
from isekai.client.client import IsekaiClient, SwapProgress, SwapResult
from isekai.client.web.sessions import Photo, Session, SessionStore

log = logging.getLogger("isekai.web")
STATIC = Path(__file__).resolve().parent / "static"
# scikit-image's sample photos offered on the page: name -> (loader name, caption).
SAMPLES = {
    "astronaut": ("astronaut", "Astronaut (Eileen Collins)"),
    "camera": ("camera", "Cameraman"),
    "chelsea": ("chelsea", "Chelsea the cat"),
    "coffee": ("coffee", "A cup of coffee"),
}


class PageError(Exception):
    """A readable message for the visitor, with the HTTP status to send it with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def readable(err: BaseException, url: str) -> PageError:
    """Any failure as a sentence a visitor can act on (logged in full here, never sent as a trace)."""
    if isinstance(err, PageError):
        return err
    status = getattr(err, "status", lambda: None)()
    message = getattr(err, "message", lambda: None)() or str(err)
    if status == "StatusCode.INVALID_ARGUMENT":
        return PageError(f"The server refused the request: {message}", 400)
    if status is not None and retry.is_busy(status, message):
        return PageError("The server is busy with other people's swaps and refused this one: try again in a "
                         "minute.", 503)
    if status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED") or isinstance(err, OSError):
        return PageError(f"The isekai server at {url} cannot be reached. Is it running? ({status or err})",
                         503)
    if status == "StatusCode.NOT_FOUND" or "unknown model" in message.lower():
        return PageError(f"The server at {url} does not serve isekai's models: {message}", 503)
    log.error("request failed: %r", err, exc_info=(type(err), err, err.__traceback__))
    return PageError(f"The server failed: {message.splitlines()[0] if message else type(err).__name__}", 500)


def decode_photo(data: bytes, name: str) -> Photo:
    """Check and decode an upload as Triton will (same limits, same EXIF rotation): the page shows that
    picture."""
    from PIL import Image  # noqa: PLC0415

    from isekai.ensemble.images import decode_image  # noqa: PLC0415

    if len(data) > C.MAX_IMAGE_BYTES:
        raise PageError(f"This file is too big: {len(data) / 2**20:.1f} MiB; the limit is "
                        f"{C.MAX_IMAGE_BYTES // 2**20} MiB.", 413)
    try:
        rgb = decode_image(data)
    except ValueError as err:
        raise PageError(f"This file is not a photo the server can use: {err}") from None
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return Photo(data=data, display=buf.getvalue(), width=rgb.shape[1], height=rgb.shape[0], name=name)


@lru_cache(maxsize=len(SAMPLES))
def sample_png(name: str) -> bytes:
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    from skimage import data  # noqa: PLC0415

    rgb = np.asarray(getattr(data, SAMPLES[name][0])())
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _number(body: dict, name: str, kind: type, lo: float, hi: float) -> Any:
    """An option from the page's JSON within the API's limits (None when absent), else a readable error."""
    value = body.get(name)
    if value in (None, ""):
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise PageError(f"{name} must be a number, not {value!r}") from None
    if not lo <= number <= hi:
        raise PageError(f"{name} must be between {lo:g} and {hi:g}, not {number:g}")
    return number


def create_app(url: str, *, timeout_s: float = 600.0) -> FastAPI:
    """The page and its API, talking to Triton's gRPC endpoint(s) at ``url`` (as IsekaiClient takes it)."""
    client = IsekaiClient(url, timeout_s=timeout_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        client.close()

    app = FastAPI(title="isekai", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    sessions = SessionStore()
    app.state.client, app.state.sessions = client, sessions

    @app.exception_handler(PageError)
    async def page_error(_request: Request, err: PageError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.exception_handler(Exception)
    async def any_error(_request: Request, err: Exception) -> JSONResponse:
        page = readable(err, url)
        return JSONResponse({"error": str(page)}, status_code=page.status)

    def session(session_id: str) -> Session:
        found = sessions.get(session_id)
        if found is None:
            raise PageError("This page's session has expired (the server restarted or was busy): reload the "
                            "page "
                            "and upload the photo again.", 404)
        return found

    def with_photo(session_id: str) -> Session:
        s = session(session_id)
        if s.photo is None or s.segment is None:
            raise PageError("Upload a photo first.")
        return s

    async def call(fn, *args, **kwargs):
        try:
            return await run_in_threadpool(fn, *args, **kwargs)
        except PageError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure becomes a sentence
            raise readable(err, url) from None

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/config")
    async def config() -> dict:
        characters = await call(client.characters)
        # The exported scheduler decides the steps a swap gets by default (25 for DPM-Solver++, 4 after an
        # LCM-LoRA export): show that number, not the DPM default, so the page asks for what the server would.
        steps = next((c.steps for c in characters if c.steps), C.DEFAULT_STEPS)
        return {
            "server": url,
            "characters": [{"name": c.name, "kind": c.kind, "prompt": c.prompt, "default": c.default,
                            "problem": c.problem} for c in characters],
            "samples": [{"name": n, "caption": caption} for n, (_, caption) in SAMPLES.items()],
            "limits": {
                "steps": [1, C.MAX_STEPS, steps], "strength": [0.05, 1.0, C.DEFAULT_STRENGTH],
                "seed": [0, C.MAX_SEED, C.DEFAULT_SEED], "upscale": list(C.UPSCALE_FACTORS),
                "image_bytes": C.MAX_IMAGE_BYTES, "points": C.MAX_POINTS,
            },
        }

    @app.post("/api/session")
    async def new_session() -> dict:
        return {"session": sessions.create().id}

    async def store_photo(s: Session, data: bytes, name: str) -> dict:
        photo = await call(decode_photo, data, name)
        with s.lock:
            s.set_photo(client, photo)
        sessions.touch()
        return {"width": photo.width, "height": photo.height, "name": photo.name}

    @app.post("/api/s/{session_id}/photo")
    async def upload(session_id: str, request: Request) -> dict:
        s = session(session_id)
        length = int(request.headers.get("content-length") or 0)
        if length > C.MAX_IMAGE_BYTES:
            raise PageError(f"This file is too big: {length / 2**20:.1f} MiB; the limit is "
                            f"{C.MAX_IMAGE_BYTES // 2**20} MiB.", 413)
        data = bytearray()
        async for chunk in request.stream():
            data.extend(chunk)
            if len(data) > C.MAX_IMAGE_BYTES:
                raise PageError(f"This file is too big; the limit is {C.MAX_IMAGE_BYTES // 2**20} MiB.", 413)
        if not data:
            raise PageError("The file is empty.")
        return await store_photo(s, bytes(data), unquote(request.headers.get("x-file-name", "photo"))[:200])

    @app.post("/api/s/{session_id}/sample/{name}")
    async def sample(session_id: str, name: str) -> dict:
        s = session(session_id)
        if name not in SAMPLES:
            raise PageError(f"No sample photo named {name!r}.", 404)
        return await store_photo(s, await call(sample_png, name), name)

    @app.get("/api/samples/{name}.png")
    async def sample_image(name: str) -> Response:
        if name not in SAMPLES:
            raise PageError(f"No sample photo named {name!r}.", 404)
        return Response(await call(sample_png, name), media_type="image/png",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/s/{session_id}/photo.png")
    async def photo(session_id: str) -> Response:
        return Response(with_photo(session_id).photo.display, media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    def mask_answer(segment, started: float) -> dict:
        return {"mask": base64.b64encode(segment.mask).decode(), "score": segment.score,
                "ms": round((time.perf_counter() - started) * 1000, 1)}

    @app.post("/api/s/{session_id}/click")
    async def click(session_id: str, request: Request) -> dict:
        s = with_photo(session_id)
        body = await request.json()
        x = _number(body, "x", float, 0, s.photo.width)
        y = _number(body, "y", float, 0, s.photo.height)
        if x is None or y is None:
            raise PageError("A click needs x and y.")
        if len(s.segment.clicks) + len(s.segment.negatives) >= C.MAX_POINTS:
            raise PageError(f"At most {C.MAX_POINTS} clicks: clear them and start again.")
        started = time.perf_counter()
        return mask_answer(await call(s.segment.click, (x, y), bool(body.get("positive", True))), started)

    @app.post("/api/s/{session_id}/box")
    async def box(session_id: str, request: Request) -> dict:
        s = with_photo(session_id)
        values = (await request.json()).get("box")
        if not isinstance(values, list) or len(values) != 4:
            raise PageError("A box needs four numbers: x0, y0, x1, y1.")
        x0, x1 = sorted(_number({"x": v}, "x", float, 0, s.photo.width) for v in values[0::2])
        y0, y1 = sorted(_number({"y": v}, "y", float, 0, s.photo.height) for v in values[1::2])
        started = time.perf_counter()
        return mask_answer(await call(s.segment.set_box, (x0, y0, x1, y1)), started)

    @app.post("/api/s/{session_id}/clear")
    async def clear(session_id: str) -> dict:
        s = session(session_id)
        s.clear_clicks(client)
        return {}

    @app.post("/api/s/{session_id}/generate")
    async def generate(session_id: str, request: Request) -> StreamingResponse:
        s = with_photo(session_id)
        if not s.segment.clicks and s.segment.box is None:
            raise PageError("Click the person first.")
        body = await request.json()
        options = {
            "character": str(body["character"]) if body.get("character") else None,
            "steps": _number(body, "steps", int, 1, C.MAX_STEPS),
            "strength": _number(body, "strength", float, 1e-6, 1.0),
            "seed": _number(body, "seed", int, 0, C.MAX_SEED),
            "upscale": _number(body, "upscale", int, min(C.UPSCALE_FACTORS), max(C.UPSCALE_FACTORS)),
            "format": "png",
        }
        if options["upscale"] is not None and options["upscale"] not in C.UPSCALE_FACTORS:
            raise PageError(f"upscale must be one of {list(C.UPSCALE_FACTORS)}")
        s.cancel()  # one Generate per visitor: a new one replaces the old
        stream = await call(s.segment.swap_stream, **options)
        s.stream = stream
        return StreamingResponse(_events(s, stream, url), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.post("/api/s/{session_id}/cancel")
    async def cancel(session_id: str) -> dict:
        session(session_id).cancel()
        return {}

    @app.get("/api/s/{session_id}/result.png")
    async def result(session_id: str, download: int = 0) -> Response:
        s = session(session_id)
        if s.result is None:
            raise PageError("No result yet: click Generate.", 404)
        name = Path(s.photo.name if s.photo else "photo").stem or "photo"
        disposition = "attachment" if download else "inline"
        return Response(s.result, media_type="image/png", headers={
            "Content-Disposition": f'{disposition}; filename="{name}.isekai.png"',
            "Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _events(s: Session, stream, url: str) -> AsyncIterator[bytes]:
    """The stream's events as NDJSON lines; the browser going away (or a new Generate) cancels the swap."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def pump() -> None:
        try:
            for event in stream:
                loop.call_soon_threadsafe(queue.put_nowait, event)
        except BaseException as err:  # noqa: BLE001 - handed to the page as a sentence
            loop.call_soon_threadsafe(queue.put_nowait, err)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="isekai-web-stream", daemon=True).start()
    try:
        while True:
            event = await queue.get()
            if event is None:
                if stream.cancelled:
                    yield _line({"cancelled": True})
                return
            if isinstance(event, BaseException):
                yield _line({"error": str(readable(event, url))})
                return
            if isinstance(event, SwapProgress):
                line: dict[str, Any] = {"stage": event.stage, "progress": round(event.progress, 4)}
                if event.preview:
                    line["preview"] = base64.b64encode(event.preview).decode()
                yield _line(line)
            elif isinstance(event, SwapResult):
                s.result = event.result
                yield _line({"done": True, "score": event.score, "bytes": len(event.result)})
    finally:
        stream.cancel()  # no-op once finished; stops the server's work if the browser left mid-swap
        if s.stream is stream:
            s.stream = None


def _line(data: dict) -> bytes:
    return (json.dumps(data) + "\n").encode()
