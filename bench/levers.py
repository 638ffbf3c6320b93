"""The speed levers of issue 5, each measured against the current default on the benchmark's own inputs.

Every lever is a :class:`Lever` row: what was measured, the default (``a``) and the alternative (``b``), and
the verdict (kept / not kept / not built, and why). Inputs come from the onnxruntime phase
(``inputs-<scene>.npz``: the scene's LaMa inputs, hole, person crop and its DPM-Solver++ character), so the
levers run on real crop sizes. Levers that only a server shows (dynamic batching of ``unet``, the embedding
cache) are measured in :mod:`bench.served` and joined in the report.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.onnx_pipeline import OnnxPipeline, config_parameters, ort_session
from bench.report import LEVER_SCHEDULER
from bench.timing import StageTimer, median, say, time_calls
from isekai import constants as C
from isekai.ensemble.crops import CropGeometry, lama_inputs
from isekai.ensemble.diffusion import DiffusionOptions
from isekai.ensemble.sam_transforms import SamTransform
from isekai.serving.ort_options import session_options


@dataclass(frozen=True)
class Lever:
    name: str  # the row label (bench.report.LEVER_ROWS)
    measure: str  # what was timed
    a_label: str  # the default
    a: float | None
    b_label: str  # the alternative
    b: float | None
    unit: str
    verdict: str  # kept / not kept / not built, with the reason

    def as_dict(self) -> dict:
        return asdict(self)


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    """Start this process's VmHWM (peak RSS) over from its current RSS (Linux: clear_refs 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _session_run(path: Path, options, feed: dict, repeats: int) -> dict:
    """Create a session with ``options``, run ``feed``: creation seconds, median run seconds, and memory above
    what the process held before: at the peak, and still held after the runs (what a server keeps between
    requests)."""
    import gc  # noqa: PLC0415

    gc.collect()
    before = _status_bytes("VmRSS")
    _reset_peak_rss()
    t0 = time.perf_counter()
    session = ort_session(path, options)
    create = time.perf_counter() - t0
    loaded = _status_bytes("VmRSS") - before
    runs = time_calls(lambda s=session: s.run(None, feed), repeats)
    result = {"create_s": create, "run_s": median(runs), "loaded_bytes": loaded,
              "peak_bytes": _status_bytes("VmHWM") - before, "held_bytes": _status_bytes("VmRSS") - before}
    del session
    return result


def _options(base: dict[str, str], **changes):
    import onnxruntime as ort  # noqa: PLC0415

    options = session_options(base)
    for key, value in changes.items():
        if key == "graph_optimization_level":
            value = getattr(ort.GraphOptimizationLevel, value)
        setattr(options, key, value)
    return options


def session_option_levers(models, feed: dict, repeats: int) -> list[Lever]:
    """intra-op threads, graph optimization level and the memory arena, on LaMa at the scene's crop."""
    path = models.onnx_path(C.LAMA_MODEL)
    params = config_parameters(models.repository, C.LAMA_MODEL)
    cores = os.cpu_count() or 1
    first = _session_run(path, session_options(params), feed, repeats)
    say(f"levers: LaMa default session {first['run_s']:.2f} s/run")
    variants = {"threads=1": _options(params, intra_op_num_threads=1)}
    levels = (("ORT_DISABLE_ALL", "disabled"), ("ORT_ENABLE_BASIC", "basic"),
              ("ORT_ENABLE_EXTENDED", "extended"))
    for level, label in levels:
        variants[label] = _options(params, graph_optimization_level=level)
    measured = {}
    for name, options in variants.items():
        measured[name] = _session_run(path, options, feed, repeats)
        say(f"levers: LaMa {name}: {measured[name]['run_s']:.2f} s/run")
    # The default again after the variants: the first session of a process pays for warming the machine up, so
    # the default's time is the better of its two measurements.
    again = _session_run(path, session_options(params), feed, repeats)
    default = min(first, again, key=lambda r: r["run_s"])
    say(f"levers: LaMa default session again {again['run_s']:.2f} s/run")
    rows = []
    one = measured["threads=1"]
    rows.append(Lever("ORT intra-op threads", "LaMa run at the scene's crop", f"{cores} (= cores)",
                      default["run_s"], "1", one["run_s"], "s",
                      "kept: threads = cores (config parameter intra_op_threads, 0 = all cores)"
                      if default["run_s"] <= one["run_s"]
                      else "not kept: one thread was faster here (noise?)"))
    for _, label in levels:
        other = measured[label]
        rows.append(Lever(f"ORT graph optimization: all vs {label}", "LaMa run at the scene's crop", "all",
                          default["run_s"], label, other["run_s"], "s",
                          "kept: ORT_ENABLE_ALL" if default["run_s"] <= other["run_s"] * 1.03
                          else f"kept all, though {label} was faster on LaMa here (all's layout transforms "
                               "pay on the UNet: see its row)"))
    return rows


def arena_lever(models, model: str, feed: dict, measure: str, repeats: int) -> Lever:
    """onnxruntime's CPU memory arena on vs off for ``model``: time, and the memory the session holds after a
    run."""
    path = models.onnx_path(model)
    params = config_parameters(models.repository, model)
    results = {}
    for arena in (True, False):
        results[arena] = r = _session_run(path, _options(params, enable_cpu_mem_arena=arena), feed, repeats)
        say(f"levers: {model} memory arena {'on' if arena else 'off'}: {r['run_s']:.2f} s/run, weights "
            f"{r['loaded_bytes'] / 2**30:.2f} GiB, peak +{r['peak_bytes'] / 2**30:.2f} GiB, held after the "
            f"runs +{r['held_bytes'] / 2**30:.2f} GiB")
    on, off = results[True], results[False]
    configured = params.get("cpu_mem_arena", "true")
    gib = 2**30
    memory = (f"held after a run {on['held_bytes'] / gib:.2f} GiB on vs {off['held_bytes'] / gib:.2f} GiB "
              f"off, peak {on['peak_bytes'] / gib:.2f} vs {off['peak_bytes'] / gib:.2f}")
    verdict = ("kept off (config parameter cpu_mem_arena false)" if configured == "false" else
               "kept on (its config keeps the default)")
    return Lever(f"ORT memory arena ({model})", measure, "on", on["run_s"], "off", off["run_s"], "s",
                 f"{verdict}: {memory} GiB")


def unet_feed(latent: tuple[int, int], batch: int, hidden: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        C.UNET_IN_SAMPLE: rng.standard_normal((batch, C.SD_LATENT_CHANNELS, *latent), dtype=np.float32),
        C.UNET_IN_TIMESTEP: np.full((batch,), 500.0, np.float32),
        C.UNET_IN_HIDDEN: rng.standard_normal((batch, C.SD_TOKEN_LENGTH, hidden), dtype=np.float32),
    }


def unet_levers(models, pipe: OnnxPipeline, latent: tuple[int, int], scene_size: tuple[int, int], repeats: int
                ) -> list[Lever]:
    hidden = pipe.store.config.text_hidden_size
    unet = pipe.sessions[C.UNET_MODEL]
    pair = unet_feed(latent, 2, hidden)
    batch2 = median(time_calls(lambda: unet.run(None, pair), repeats))
    say(f"levers: UNet batch-2 step at latent {latent}: {batch2:.2f} s")
    single = unet_feed(latent, 1, hidden)
    two_calls = median(time_calls(lambda: (unet.run(None, single), unet.run(None, single)), repeats))
    rows = [Lever("CFG as one batch-2 UNet call", f"one guidance step, latent {latent[0]}x{latent[1]}",
                  "one batch-2 call", batch2, "two batch-1 calls", two_calls, "s",
                  "kept: one batch-2 call" if batch2 <= two_calls else
                  "kept for serving anyway (one BLS round trip per step, and batching across requests); "
                  "two batch-1 calls were faster in-process here")]
    # Diffusion on the whole scene instead of the person's crop, the scene resized to 1.5x SD's native long
    # side (the person gets fewer pixels than in the crop, and the step already costs several times more; at
    # the exported UNet's limit, 1024, one attention matrix alone would take ~5 GB).
    limit = 3 * C.SD_NATIVE_SIZE // 2
    h, w = scene_size
    scale = limit / max(h, w)
    whole = tuple(max(C.SD_SIZE_MULTIPLE, round(s * scale / C.SD_SIZE_MULTIPLE) * C.SD_SIZE_MULTIPLE) // 8
                  for s in (h, w))
    whole_feed = unet_feed(whole, 2, hidden)
    # One call, no warm-up: at ~4x the crop's latent cells (and its attention's square) one call is long
    # enough.
    whole_step = median(time_calls(lambda: unet.run(None, whole_feed), 1, warmup=0))
    say(f"levers: UNet step on the whole scene at latent {whole}: {whole_step:.2f} s")
    rows.append(Lever("diffusion on the person crop (512 long side)", "one UNet step (batch 2)",
                      f"crop, latent {latent[0]}x{latent[1]}", batch2,
                      f"whole scene at {whole[0] * 8}x{whole[1] * 8}, latent {whole[0]}x{whole[1]}",
                      whole_step, "s", "kept: the crop at SD's native size"))
    params = config_parameters(models.repository, C.UNET_MODEL)
    basic = _session_run(models.onnx_path(C.UNET_MODEL),
                         _options(params, graph_optimization_level="ORT_ENABLE_BASIC"), pair, repeats)
    say(f"levers: UNet graph optimization basic: {basic['run_s']:.2f} s/step")
    rows.append(Lever("ORT graph optimization on the UNet: all vs basic", "one UNet step (batch 2)", "all",
                      batch2, "basic", basic["run_s"], "s",
                      "kept: ORT_ENABLE_ALL" if batch2 <= basic["run_s"] * 1.02 else
                      "basic was as fast here; kept all"))
    return rows


def scheduler_lever(pipe: OnnxPipeline, inputs, options: DiffusionOptions, dpm_s: float | None,
                    results_dir: Path, repeats_label: str) -> tuple[Lever, Path]:
    """PNDM at twice the request's steps (50 for the API's 25: diffusers' PNDM default) against DPM-Solver++
    at the request's steps, same crop, strength, guidance and seed."""
    from diffusers import PNDMScheduler  # noqa: PLC0415

    from bench.inprocess import step_progress  # noqa: PLC0415

    crop = inputs["person_image"]
    pndm_steps = 2 * options.steps
    pndm_options = DiffusionOptions(steps=pndm_steps, strength=options.strength, guidance=options.guidance,
                                    seed=options.seed)
    timer = StageTimer()
    t0 = time.perf_counter()
    pndm = pipe.img2img(crop, pndm_options, timer, scheduler_cls=PNDMScheduler,
                        progress=step_progress(f"levers: PNDM {pndm_steps}"))
    pndm_s = time.perf_counter() - t0
    calls = len(timer.calls["unet_step"])
    png = results_dir / f"scheduler-dpm{options.steps}-vs-pndm{pndm_steps}{repeats_label}.png"
    side_by_side([crop, inputs["character"], pndm], png)
    lever = Lever(LEVER_SCHEDULER,
                  f"img2img at strength {options.strength} (PNDM: {calls} UNet "
                  "calls)", f"DPM-Solver++ {options.steps} steps", dpm_s, f"PNDM {pndm_steps} steps", pndm_s,
                  "s", f"kept: DPM-Solver++ {options.steps} (outputs side by side: {png.name})")
    return lever, png


def side_by_side(images: list[np.ndarray], path: Path, long_side: int = 256) -> None:
    """[input | DPM-Solver++ | PNDM] at ``long_side`` px each, palette PNG (small enough to commit)."""
    from PIL import Image  # noqa: PLC0415

    tiles = []
    for image in images:
        tile = Image.fromarray(image)
        tile.thumbnail((long_side, long_side))
        tiles.append(tile)
    canvas = Image.new("RGB",
                       (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), max(t.height for t in tiles)),
                       "white")
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + 4
    canvas.quantize(64).save(path, optimize=True)


def lama_levers(models, fft_onnx: Path, scene_inputs: dict, repeats: int) -> list[Lever]:
    """The DFT as matmuls vs the ONNX DFT operator (each scene's crop), and the crop vs the whole scene."""
    matmul = ort_session(models.onnx_path(C.LAMA_MODEL), session_options(config_parameters(models.repository,
                                                                                           C.LAMA_MODEL)))
    onnx_dft = ort_session(fft_onnx, session_options(config_parameters(models.repository, C.LAMA_MODEL)))
    rows = []
    for name, inputs in scene_inputs.items():
        feed = {C.LAMA_IN_IMAGE: inputs["lama_image"], C.LAMA_IN_MASK: inputs["lama_mask"]}
        a = median(time_calls(lambda f=feed: matmul.run(None, f), repeats))
        b = median(time_calls(lambda f=feed, s=onnx_dft: s.run(None, f), repeats))
        h, w = feed[C.LAMA_IN_IMAGE].shape[2:]
        say(f"levers: LaMa {name} crop {h}x{w}: matmul DFT {a:.2f} s, ONNX DFT {b:.2f} s")
        rows.append(Lever(f"LaMa FFT as matmul ({name})", f"LaMa at the crop, {h}x{w}", "matmul (cos/sin)", a,
                          "ONNX DFT operator", b, "s",
                          "kept: --fft matmul" if a <= b else "the DFT operator was faster here: see note"))
    del onnx_dft
    name = max(scene_inputs, key=lambda n: scene_inputs[n]["rgb"].size)
    inputs = scene_inputs[name]
    rgb, hole = inputs["rgb"], inputs["hole"]
    h, w = rgb.shape[:2]
    whole = CropGeometry.plan((0, 0, w, h), long_side=max(h, w), multiple=C.LAMA_MODULO, upscale=False,
                              min_side=C.LAMA_MIN_SIDE)
    image, mask = lama_inputs(rgb, hole, whole)
    crop_feed = {C.LAMA_IN_IMAGE: inputs["lama_image"], C.LAMA_IN_MASK: inputs["lama_mask"]}
    a = median(time_calls(lambda: matmul.run(None, crop_feed), repeats))
    b = median(time_calls(lambda: matmul.run(None, {C.LAMA_IN_IMAGE: image, C.LAMA_IN_MASK: mask}), 1))
    ch, cw = crop_feed[C.LAMA_IN_IMAGE].shape[2:]
    say(f"levers: LaMa {name}: crop {ch}x{cw} {a:.2f} s, whole scene {image.shape[2]}x{image.shape[3]} "
        f"{b:.2f} s")
    rows.append(Lever("LaMa on a crop around the mask", f"LaMa on the {name} scene",
                      f"crop (hole box + margin, long side <= {C.LAMA_WORKING_SIZE}): {ch}x{cw}", a,
                      f"whole scene {image.shape[2]}x{image.shape[3]}", b, "s", "kept: the crop"))
    return rows


def transfer_lever(inputs, options: DiffusionOptions, e2e_s: float | None, hidden: int) -> Lever:
    """IO binding / DLPack between BLS calls: what the copies they would save cost, measured as memcpy
    time."""
    crop = inputs["person_image"]
    h, w = crop.shape[:2]
    lh, lw = h // 8, w // 8
    f32 = 4
    sam_call = (3 * C.SAM_IMAGE_SIZE**2 + C.SAM_EMBEDDING_CHANNELS * C.SAM_EMBEDDING_SIZE**2) * f32
    lama = inputs["lama_image"].nbytes * 2 + inputs["lama_mask"].nbytes
    unet_step = (2 * 4 * lh * lw * 2 + 2 * C.SD_TOKEN_LENGTH * hidden + 2) * f32
    vae = (3 * h * w + 4 * lh * lw) * f32 * 2
    # The photo's encode, and the generated crop's with silhouette "sam".
    sam_calls = 1 if C.DEFAULT_SILHOUETTE == "person_mask" else 2
    moved = sam_calls * sam_call + lama + options.denoising_steps() * unet_step + vae
    buffer = np.ones(moved // 4, np.float32)
    target = np.empty_like(buffer)
    copy_s = median(time_calls(lambda: np.copyto(target, buffer), 3))
    # A BLS call copies inputs into the stub's shared memory and outputs back out: two copies of every byte.
    per_swap = 2 * copy_s
    share = f" = {100 * per_swap / e2e_s:.3f} % of the swap" if e2e_s else ""
    return Lever("IO binding / DLPack between BLS calls",
                 f"copies of the {moved / 2**20:.0f} MiB a swap moves between "
                 "stages", "copies (now)", per_swap, "zero-copy", 0.0, "s",
                 f"not built: the copies cost {per_swap * 1e3:.0f} ms per swap{share}")


def silhouette_lever(models, inputs, repeats: int) -> Lever:
    """compose's silhouette: SAM on the generated crop (the second encode of a swap) against the person's own
    mask carried into the crop (no model call). Quality is bench/silhouette.py's to measure."""
    pipe = OnnxPipeline(models.repository, models=(C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL))
    character = inputs["character"]
    h, w = character.shape[:2]
    box = np.array([0, 0, w, h], np.float32)
    sam_s = median(time_calls(lambda: pipe.decode(pipe.encode(character), (h, w), None, None, box), repeats))
    say(f"levers: SAM silhouette of the {h}x{w} character crop: {sam_s:.2f} s")
    kept = C.DEFAULT_SILHOUETTE == "person_mask"
    return Lever("compose's silhouette: person's mask vs SAM on the generated crop",
                 f"one swap's silhouette, {h}x{w} character crop", "the person's mask (no model call)", None,
                 "SAM encode + decode (compose parameter silhouette: sam)", sam_s, "s",
                 "kept: the person's mask (bench/results/silhouette*.md: what random weights check)" if kept
                 else "kept: SAM on the crop")


def load_inputs(models, scene, workdir: Path, options: DiffusionOptions, nonce: str) -> dict:
    """The onnxruntime phase's saved inputs for ``scene``, or made here by one in-process swap."""
    from bench.inprocess import save_inputs  # noqa: PLC0415

    path = workdir / f"inputs-{scene.name}.npz"
    if not path.exists():
        say(f"levers: no saved inputs for {scene.name}; one in-process swap to make them")
        out = OnnxPipeline(models.repository).swap(scene.png(f"{nonce}-levers"), scene.click, options,
                                                   StageTimer())
        save_inputs(path, scene, out)
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def run(models, scenes, options: DiffusionOptions, workdir: Path, results_dir: Path, fft_onnx: Path,
        repeats: int, dpm_s: dict[str, float | None], e2e_s: dict[str, float | None], nonce: str,
        png_suffix: str = "") -> dict:
    scene_inputs = {scene.name: load_inputs(models, scene, workdir, options, nonce) for scene in scenes}
    first = scenes[0].name
    crop = scene_inputs[first]
    lama_feed = {C.LAMA_IN_IMAGE: crop["lama_image"], C.LAMA_IN_MASK: crop["lama_mask"]}
    rows = session_option_levers(models, lama_feed, repeats)
    rows.append(arena_lever(models, C.LAMA_MODEL, lama_feed, "LaMa run at the scene's crop", repeats))
    sam_feed = {C.SAM_ENC_IN_IMAGE: SamTransform().encoder_input(crop["rgb"])}
    rows.append(arena_lever(models, C.SAM_ENCODER_MODEL, sam_feed, "SAM encoder run", max(1, repeats - 1)))
    rows += lama_levers(models, fft_onnx, scene_inputs, repeats)
    pipe = OnnxPipeline(models.repository, models=(C.UNET_MODEL, C.VAE_ENCODER_MODEL, C.VAE_DECODER_MODEL))
    h, w = crop["person_image"].shape[:2]
    latent = (h // C.SD_VAE_FACTOR, w // C.SD_VAE_FACTOR)
    largest = max(scenes, key=lambda s: s.rgb.size)
    rows += unet_levers(models, pipe, latent, largest.size, max(1, repeats - 1))
    scheduler, png = scheduler_lever(pipe, crop, options, dpm_s.get(first), results_dir, png_suffix)
    rows.append(scheduler)
    rows.append(transfer_lever(crop, options, e2e_s.get(first), pipe.store.config.text_hidden_size))
    rows.append(silhouette_lever(models, crop, max(1, repeats - 1)))
    return {"rows": [r.as_dict() for r in rows], "scheduler_png": png.name}
