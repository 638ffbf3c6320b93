"""Bounded load runs with zero errors: concurrent clients over loopback gRPC, mostly isekai_segment (mixed
photos, repeated clicks) plus some isekai swaps; then the same while sam_decoder is reloaded through the
repository API.

The server is ``isekai serve --admin-key``: explicit model control with the repository API behind the key. The
counts are printed (``pytest -s``) for the closing note; the load generator is :mod:`isekai.client.load`.
"""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from isekai import constants as C
from isekai.cli import main
from isekai.client.load import LoadMix, Photo, run_load
from isekai.serving.stubs import server_stubs
from tests.conftest import ASTRONAUT_CLICK, png_bytes
from tests.e2e.serve import IsekaiServe

pytestmark = pytest.mark.e2e

ADMIN_KEY = "load-test-key"
REQUESTS = 200
CONCURRENCY = 4
DURATION_S = 50  # a bound, not a target: the run ends after REQUESTS or this, whichever comes first
SWAP_FRACTION = 0.05
SWAP_OPTIONS = {"steps": 2}


@pytest.fixture(scope="module")
def serve(demo_repository, tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    s = IsekaiServe(demo_repository, root / "serve.log", "--admin-key", ADMIN_KEY, "--grace", "30").start()
    yield s
    assert s.terminate() == 0, s.log_tail()


@pytest.fixture(scope="module")
def mix(astronaut_png) -> LoadMix:
    rgb = np.asarray(Image.open(io.BytesIO(astronaut_png)).convert("RGB"))
    clicks = (ASTRONAUT_CLICK, (220.0, 250.0), (180.0, 380.0), (260.0, 120.0))
    mirrored = tuple((512 - x, y) for x, y in clicks)
    return LoadMix(
        photos=(
            Photo(astronaut_png, clicks),
            Photo(png_bytes(rgb[:, ::-1].copy()), mirrored),
            Photo(png_bytes(rgb[64:448, 32:480].copy()), tuple((x - 32, y - 64) for x, y in clicks)),
            Photo(png_bytes((rgb // 2 + 64).astype(np.uint8)), clicks),
        ),
        swap_fraction=SWAP_FRACTION,
        swap_options=SWAP_OPTIONS,
        max_clicks=2,
        seed=11,
    )


def test_load_run_has_zero_errors(serve, mix):
    report = run_load(serve.grpc_url, REQUESTS, CONCURRENCY, DURATION_S, mix)
    print(f"\nload run ({CONCURRENCY} clients, {len(mix.photos)} photos):\n{report.table()}")
    assert report.ok, report.table()
    assert report.sent >= REQUESTS // 2, "the run was cut short by its time bound"
    assert report.by_model.get(C.SEGMENT_MODEL, 0) > report.by_model.get(C.ENSEMBLE_MODEL, 0) > 0


def reload_until(serve, stop: threading.Event, gap_s: float, took: list[float]) -> None:
    """Reload sam_decoder (a real reload: a new stub; the ensembles that use it are reloaded too) through the
    repository API with the admin key, again and again until ``stop`` is set."""
    triton = grpcclient.InferenceServerClient(serve.grpc_url)
    headers = {C.GRPC_RESTRICTED_HEADER_PREFIX + C.ADMIN_KEY_HEADER: ADMIN_KEY}
    try:
        while not stop.wait(gap_s):
            config = triton.get_model_config(C.SAM_DECODER_MODEL, as_json=True)["config"]
            config.setdefault("parameters", {})["load_test"] = {"string_value": str(len(took))}
            started = time.monotonic()
            triton.load_model(C.SAM_DECODER_MODEL, config=json.dumps(config), headers=headers)
            if not stop.is_set():
                took.append(time.monotonic() - started)
    finally:
        triton.close()


def test_load_run_while_a_model_is_reloaded_has_zero_failed_requests(serve, mix):
    triton = serve.triton_pid()
    before = {s.pid for s in server_stubs(triton) if s.model == C.SAM_DECODER_MODEL}
    reloads: list[float] = []
    stop = threading.Event()
    reloader = threading.Thread(target=reload_until, args=(serve, stop, 1.0, reloads))
    reloader.start()
    try:
        report = run_load(serve.grpc_url, REQUESTS, CONCURRENCY, DURATION_S,
                          LoadMix(**{**mix.__dict__, "seed": 12}))
    finally:
        stop.set()
        reloader.join()
    after = {s.pid for s in server_stubs(triton) if s.model == C.SAM_DECODER_MODEL and not s.zombie}
    took = ", ".join(f"{r:.1f}" for r in reloads)
    print(
        f"\nload run while sam_decoder was reloaded {len(reloads)} times ({took} s each):\n{report.table()}"
    )
    assert len(reloads) >= 3 and after and not after & before, "sam_decoder was not really reloaded"
    assert report.ok, report.table()
    assert "died" not in serve.log.read_text(), "the supervisor took a reload for a crash"


def test_isekai_load_cli_prints_the_run_and_tritons_account_of_it(serve, astronaut_png, tmp_path, capsys):
    """``isekai load ... --metrics-url``: the client's counts and latencies, then Triton's queue vs compute
    per model."""
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(astronaut_png)
    x, y = ASTRONAUT_CLICK
    code = main(["load", str(photo), "--click", f"{x},{y}", "--requests", "12", "--concurrency", "2",
                 "--swap-fraction", "0", "--url", serve.grpc_url, "--metrics-url", serve.metrics_url])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Triton's account of the run" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert C.SEGMENT_MODEL in rows and C.SAM_DECODER_MODEL in rows, out
    assert rows[C.SEGMENT_MODEL].split("|")[2].strip() == "12", rows[C.SEGMENT_MODEL]
