"""What the page adds to a click: a cached ``isekai_segment`` call straight over gRPC against the same click
through ``isekai web`` (HTTP to the app, the app's gRPC call, the mask back as JSON).

    python -m bench.web_click [--url HOST:8001] [--clicks 40]

Without ``--url`` it serves the small checkpoints (the test repository) on the embedded Triton. Prints a
table; never runs in CI.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLICK = (200.0, 300.0)  # the astronaut's chest


def _post(url: str, data: bytes, content_type: str = "application/json") -> dict:
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def measure(grpc_url: str, clicks: int) -> dict[str, list[float]]:
    from PIL import Image  # noqa: PLC0415
    from skimage import data  # noqa: PLC0415

    from isekai.client.client import IsekaiClient  # noqa: PLC0415
    from isekai.client.web.cli import PageServer  # noqa: PLC0415
    from isekai.serving.server import free_port  # noqa: PLC0415

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    photo = buf.getvalue()
    client = IsekaiClient(grpc_url)
    times: dict[str, list[float]] = {"isekai_segment over gRPC": [], "the page's click (HTTP + gRPC)": []}
    with PageServer(grpc_url, port=free_port()) as page:
        session = _post(f"{page.url}api/session", b"")["session"]
        _post(f"{page.url}api/s/{session}/photo", photo, "image/png")
        client.segment(photo, [CLICK])  # the embedding is cached from here on
        for _ in range(clicks):
            t0 = time.perf_counter()
            client.segment(photo, [CLICK])
            t1 = time.perf_counter()
            _post(f"{page.url}api/s/{session}/clear", b"")
            t2 = time.perf_counter()
            _post(f"{page.url}api/s/{session}/click", json.dumps({"x": CLICK[0], "y": CLICK[1]}).encode())
            t3 = time.perf_counter()
            times["isekai_segment over gRPC"].append((t1 - t0) * 1000)
            times["the page's click (HTTP + gRPC)"].append((t3 - t2) * 1000)
    client.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running isekai server's gRPC address (default: start the small one)")
    parser.add_argument("--clicks", type=int, default=40, help="clicks measured each way")
    args = parser.parse_args()
    if args.url:
        times = measure(args.url, args.clicks)
    else:
        from isekai.export.demo import build_demo_repository  # noqa: PLC0415
        from isekai.serving.server import ServerOptions, TritonServer, free_port  # noqa: PLC0415

        cache = ROOT / ".cache" / "tests"
        repository = build_demo_repository(cache / "model_repository", cache / "checkpoints")
        options = ServerOptions(repository=repository, grpc_port=free_port(), http_port=free_port(),
                                metrics_port=free_port())
        with TritonServer(options, log_path=cache / "web_click.server.log") as server:
            times = measure(server.grpc_url, args.clicks)
    print(f"{'path':<34}{'p50 ms':>9}{'p90 ms':>9}")
    for name, values in times.items():
        values = sorted(values)
        print(f"{name:<34}{statistics.median(values):>9.1f}{values[int(0.9 * (len(values) - 1))]:>9.1f}")
    added = statistics.median(times["the page's click (HTTP + gRPC)"]) - statistics.median(
        times["isekai_segment over gRPC"])
    print(f"the page adds {added:.1f} ms per click (p50)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
