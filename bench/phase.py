"""One phase of the benchmark in its own process: ``python -m bench.phase NAME CONFIG.json OUT.json``.

Each configuration loads its own copy of the full-size models (PyTorch, onnxruntime sessions, a Triton
server), so the phases run one after another in fresh processes: memory from one never counts against the
next, and the machine (2 cores, 24 GiB here) never holds two copies at once. ``bench.cli`` writes CONFIG and
reads OUT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import models as M
from bench.scenes import scenes as all_scenes
from bench.scenes import with_click
from isekai.ensemble.diffusion import DiffusionOptions


def _models(cfg: dict) -> M.BenchModels:
    return M.prepare(cfg["profile"], cfg["sam"], Path(cfg["cache"]),
                     repository=Path(cfg["repository"]) if cfg.get("repository") else None,
                     checkpoints=Path(cfg["checkpoints"]) if cfg.get("checkpoints") else None)


def make_scenes(cfg: dict) -> list:
    """The run's scenes, each with the click the prepare phase found (where this SAM finds a person)."""
    clicks = cfg.get("clicks") or {}
    return [with_click(s, clicks.get(s.name)) for s in all_scenes(cfg["scenes"])]


def main(argv: list[str] | None = None) -> int:
    name, config_path, out_path = argv or sys.argv[1:]
    cfg = json.loads(Path(config_path).read_text())
    options = DiffusionOptions(**cfg["options"])
    warmup = DiffusionOptions(**cfg["warmup_options"])
    workdir = Path(cfg["workdir"])
    nonce = cfg["nonce"]
    if name == "prepare":
        models = _models(cfg)
        from bench.onnx_pipeline import person_clicks  # noqa: PLC0415

        result = {"repository": str(models.repository), "weight_bytes": models.weight_bytes()}
        cache = Path(cfg["cache"]) / cfg["profile"] / f"clicks-{cfg['sam']}.json"
        result["clicks"] = person_clicks(models.repository, all_scenes(cfg["scenes"]), cache)
        if not cfg.get("skip_levers"):
            result["lama_fft_onnx"] = str(M.lama_fft_onnx(models, Path(cfg["cache"])))
    elif name in ("baseline", "same_work"):
        from bench import baseline  # noqa: PLC0415

        mode = "seed" if name == "baseline" else "same_work"
        result = baseline.run(_models(cfg), make_scenes(cfg), options, cfg["runs"], warmup, nonce, mode=mode)
    elif name == "onnxruntime":
        from bench import inprocess  # noqa: PLC0415

        result = inprocess.run(_models(cfg), make_scenes(cfg), options, cfg["runs"], warmup, workdir, nonce)
    elif name == "served":
        from bench import served  # noqa: PLC0415

        result = served.run(
            _models(cfg), make_scenes(cfg), cfg["served_options"], cfg["runs"],
            log=workdir / "tritonserver.log", warmup_options=cfg["served_warmup_options"],
            latent=tuple(cfg["latent"]), batching_repeats=cfg["repeats"],
            concurrent_options=cfg["concurrent_options"], load_requests=cfg["load_requests"],
            load_concurrency=tuple(cfg["load_concurrency"]), nonce=nonce,
        )
    elif name == "fast":
        from bench import served  # noqa: PLC0415
        from bench.onnx_pipeline import crop_sizes, person_clicks  # noqa: PLC0415

        fast = M.fast_models(cfg)
        # Its own clicks: where this (random-weight) SAM finds someone, as the other configurations' are
        # theirs.
        cache = Path(cfg["cache"]) / cfg["profile"] / "clicks-fast.json"
        clicks = person_clicks(fast.repository, all_scenes(cfg["scenes"]), cache)
        scenes = [with_click(s, clicks[s.name]["click"]) for s in all_scenes(cfg["scenes"])]
        crops = crop_sizes(fast.repository, scenes)
        result = served.run(
            fast, scenes, cfg["fast_options"], cfg["runs"],
            log=workdir / "tritonserver-fast.log", warmup_options=cfg["fast_warmup_options"],
            latent=tuple(cfg["latent"]), batching_repeats=cfg["repeats"], concurrent_options={},
            load_requests=0, load_concurrency=(), nonce=nonce, swaps_and_clicks_only=True,
        )
        result.update(clicks=clicks, crops=crops, repository=str(fast.repository))
    elif name == "levers":
        from bench import levers  # noqa: PLC0415

        result = levers.run(
            _models(cfg), make_scenes(cfg), options, workdir, Path(cfg["output"]),
            Path(cfg["lama_fft_onnx"]), cfg["repeats"], cfg["dpm_s"], cfg["e2e_s"], nonce,
            png_suffix=cfg["png_suffix"],
        )
    else:
        raise SystemExit(f"unknown phase {name!r}")
    from bench.encoder_run import machine  # noqa: PLC0415

    result["machine"] = machine()  # which CPU (AVX-512 or not) this phase's figures came from
    Path(out_path).write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
