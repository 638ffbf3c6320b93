"""Shared fixtures: the small-checkpoint model repository and a real tritonserver on free loopback ports."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from isekai.client.client import IsekaiClient
from isekai.serving.server import ServerOptions, TritonServer, free_port

ROOT = Path(__file__).resolve().parent.parent
# Reused between local runs (exports are skipped when present); CI starts from a clean clone.
CACHE = Path(os.environ.get("ISEKAI_TEST_CACHE", ROOT / ".cache" / "tests"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a module's tiny models (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): they run
    faster on one thread; with two, OpenMP barriers stall for whole time slices whenever the 2 CI cores are
    shared (a Triton server, another test process): 0.15 s became 15-50 s here."""
    import torch  # noqa: PLC0415 - torch-heavy, only for the modules that ask

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_repository() -> Path:
    """A model repository with every model exported from small random-weight checkpoints."""
    from isekai.export.demo import build_demo_repository  # noqa: PLC0415 - torch-heavy, only when asked

    return build_demo_repository(CACHE / "model_repository", CACHE / "checkpoints")


@pytest.fixture(scope="session")
def lcm_repository(demo_repository: Path) -> Path:
    """The demo repository's LCM twin: its SAM, LaMa and upscale graphs, and its tiny SD exported with a
    random LCM-LoRA-shaped LoRA fused (``isekai export sd --lcm-lora``); the LoRA file lies in the demo's
    checkpoints."""
    from isekai.export.demo import build_lcm_repository  # noqa: PLC0415 - torch-heavy, only when asked

    return build_lcm_repository(CACHE / "lcm_repository", demo_repository, CACHE / "checkpoints")


def start_server(repository: Path, log_path: Path, **options):
    opts = ServerOptions(
        repository=repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
        **options
    )
    server = TritonServer(opts, log_path=log_path)
    server.start()
    try:
        server.wait_ready(timeout_s=600)
    except BaseException:
        server.stop(grace_s=5)
        raise
    return server


@pytest.fixture(scope="session")
def server(demo_repository: Path, tmp_path_factory):
    """One tritonserver for the end-to-end tests that do not disturb it."""
    log = tmp_path_factory.mktemp("triton") / "server.log"
    srv = start_server(demo_repository, log)
    yield srv
    srv.stop(grace_s=30)


@pytest.fixture(scope="session")
def client(server):
    c = IsekaiClient(server.grpc_url)
    yield c
    c.close()


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def astronaut_png() -> bytes:
    """A real photo of a person that ships inside scikit-image (512x512 RGB)."""
    return png_bytes(data.astronaut())


# Where the demo and the tests click: the astronaut's chest in skimage.data.astronaut() (x, y).
ASTRONAUT_CLICK = (200.0, 300.0)
