"""``isekai demo``: small checkpoints -> exported repository -> embedded Triton -> one real photo -> outputs.

Everything happens under ``.demo/`` (configurable): the checkpoints, the model repository, the input photo
and, next to it, the result, the mask and the background.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

from isekai import constants as C

# The astronaut's chest in skimage.data.astronaut() (x, y): the person the demo turns into a character.
DEMO_CLICK = (200.0, 300.0)

# Pipeline order, for printing where the time went.
STAGES = [
    C.ENSEMBLE_MODEL, C.PREPROCESS_MODEL, C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL, C.PREPARE_MODEL,
    C.LAMA_MODEL, C.DIFFUSION_MODEL, C.TEXT_ENCODER_MODEL, C.VAE_ENCODER_MODEL, C.UNET_MODEL,
    C.VAE_DECODER_MODEL, C.COMPOSE_MODEL, C.FINISH_MODEL, C.UPSCALE_MODEL,
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path(".demo"),
                        help="where everything the demo makes goes")
    parser.add_argument("--steps", type=int, default=C.DEFAULT_STEPS, help="denoising steps")
    parser.add_argument("--seed", type=int, default=7, help="noise seed")
    parser.add_argument(
        "--upscale", type=int, choices=C.UPSCALE_FACTORS, default=C.DEFAULT_UPSCALE,
        help="make the result this many times the photo's size with the demo's (tiny, random) Real-ESRGAN",
    )
    parser.add_argument(
        "--web", action="store_true",
        help="instead of one swap: serve the demo repository and the page (isekai web) until Ctrl-C",
    )
    parser.add_argument("--host", default=C.DEFAULT_WEB_HOST, help="with --web: address the page listens on")
    parser.add_argument("--port", type=int, default=C.DEFAULT_WEB_PORT,
                        help="with --web: port the page listens on")


def web(work: Path, host: str, port: int) -> int:
    """``isekai demo --web``: the small checkpoints served by the embedded Triton, and the page in front of
    it."""
    import threading  # noqa: PLC0415

    from isekai.client.web.cli import PageServer  # noqa: PLC0415
    from isekai.export.demo import build_demo_repository  # noqa: PLC0415
    from isekai.serving.server import ServerOptions, TritonServer, free_port  # noqa: PLC0415

    print(f"[1/3] small checkpoints in the real formats, exported into {work / 'model_repository'}",
          flush=True)
    repository = build_demo_repository(work / "model_repository", work / "checkpoints")
    options = ServerOptions(
        repository=repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()
    )
    log = work / "tritonserver.log"
    print(f"[2/3] starting the embedded Triton server (log: {log})", flush=True)
    with TritonServer(options, log_path=log) as server:
        print(f"      ready: gRPC {server.grpc_url}, metrics {server.metrics_url}", flush=True)
        with PageServer(server.grpc_url, host=host, port=port) as page:
            print(f"[3/3] the page: {page.url}  (random weights draw noise; Ctrl-C stops)", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                print("\nstopping", flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    import numpy as np  # noqa: PLC0415
    import tritonclient.grpc as grpcclient  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    from skimage import data  # noqa: PLC0415

    from isekai.client.client import IsekaiClient  # noqa: PLC0415
    from isekai.client.stats import format_stage_table, model_stats, stats_delta  # noqa: PLC0415
    from isekai.export.demo import build_demo_repository  # noqa: PLC0415
    from isekai.serving.server import ServerOptions, TritonServer, free_port  # noqa: PLC0415

    work = args.workdir.resolve()
    if args.web:
        return web(work, args.host, args.port)
    t0 = time.perf_counter()
    print(f"[1/4] small checkpoints in the real formats, exported into {work / 'model_repository'}",
          flush=True)
    repository = build_demo_repository(work / "model_repository", work / "checkpoints")

    photo = work / "astronaut.png"
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    photo.write_bytes(buf.getvalue())

    options = ServerOptions(
        repository=repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()
    )
    log = work / "tritonserver.log"
    print(f"[2/4] starting the embedded Triton server (log: {log})", flush=True)
    t1 = time.perf_counter()
    with TritonServer(options, log_path=log) as server:
        print(f"      ready in {time.perf_counter() - t1:.1f}s: gRPC {server.grpc_url}, metrics "
              f"{server.metrics_url}")
        stats_client = grpcclient.InferenceServerClient(server.grpc_url)
        before = model_stats(stats_client)
        upscale = f" --upscale {args.upscale}" if args.upscale != C.DEFAULT_UPSCALE else ""
        print(f"[3/4] isekai run {photo.name} --click {DEMO_CLICK[0]:.0f},{DEMO_CLICK[1]:.0f} "
              f"--steps {args.steps} --seed {args.seed}{upscale}", flush=True)
        client = IsekaiClient(server.grpc_url)
        t2 = time.perf_counter()
        out = client.swap(photo.read_bytes(), [DEMO_CLICK], steps=args.steps, seed=args.seed,
                          upscale=args.upscale)
        elapsed = time.perf_counter() - t2
        delta = stats_delta(before, model_stats(stats_client))
        others = {}
        for character in client.characters():
            print(f"      character {character.name!r} "
                  f"({character.kind}{', default' if character.default else ''}): {character.prompt}")
            if not character.default and character.drawable:
                # The same base UNet draws it, with the character's LoRA adapter applied for this request.
                t3 = time.perf_counter()
                others[character.name] = client.swap(photo.read_bytes(), [DEMO_CLICK],
                                                     character=character.name, steps=args.steps,
                                                     seed=args.seed, upscale=args.upscale)
                print(f"      ... swapped as {character.name!r} in {time.perf_counter() - t3:.2f}s",
                      flush=True)
        print("[4/4] stopping the server", flush=True)
    outputs = {
        "result": work / "astronaut.result.png",
        "mask": work / "astronaut.mask.png",
        "background": work / "astronaut.background.png",
    }
    for name, swap in others.items():
        outputs[f"as {name}"] = work / f"astronaut.{name}.result.png"
        outputs[f"as {name}"].write_bytes(swap.result)
    outputs["result"].write_bytes(out.result)
    outputs["mask"].write_bytes(out.mask)
    outputs["background"].write_bytes(out.background)
    mask = np.asarray(Image.open(outputs["mask"])) > 0
    print(f"\nrequest took {elapsed:.2f}s end to end; mask score {out.score:.3f}, "
          f"person pixels {int(mask.sum())} of {mask.size}")
    print("where the time went (Triton's own statistics; BLS callers include their callees):")
    print(format_stage_table(delta, STAGES))
    print("\nwrote:")
    print(f"  {'input':<15} {photo}")
    for name, path in outputs.items():
        print(f"  {name:<15} {path}")
    print(f"demo done in {time.perf_counter() - t0:.0f}s")
    return 0
