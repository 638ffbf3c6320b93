"""The isekai swap in one process: the exported graphs in onnxruntime, the ``ensemble/`` logic between them.

This is configuration 2 of the benchmark (no Triton): the same graphs, the same session options as the served
default profile (:func:`isekai.serving.ort_options.session_options` on each model's config parameters), and
the same pipeline code the ``model.py`` adapters call, in the same order, with LaMa running beside the
diffusion as the ensemble's scheduler runs its two independent branches (``parallel``; sequential on request,
a lever), and the character cut by the silhouette compose uses (``silhouette``: the person's mask by default).
So the difference to configuration 3 is what Triton adds (gRPC, the ensemble scheduler, BLS and the
Python-backend stubs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.timing import StageTimer
from isekai import constants as C
from isekai.ensemble.characters import CharacterStore
from isekai.ensemble.compose import Prepared, compose_scene, prepare_person, public_mask
from isekai.ensemble.diffusion import DiffusionOptions, img2img, scheduler_class
from isekai.ensemble.images import decode_image, encode_image
from isekai.ensemble.sam_transforms import SamTransform
from isekai.serving.ort_options import session_options

# The graphs one swap runs (text_encoder only runs for a request's own prompt: characters are precomputed).
SWAP_MODELS = (C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL, C.LAMA_MODEL, C.UNET_MODEL, C.VAE_ENCODER_MODEL,
               C.VAE_DECODER_MODEL)


def config_parameters(repository: Path, model: str) -> dict[str, str]:
    """``parameters`` of ``<repository>/<model>/config.pbtxt`` as a dict (what the served model reads)."""
    from google.protobuf import text_format  # noqa: PLC0415
    from tritonclient.grpc import model_config_pb2  # noqa: PLC0415

    config = text_format.Parse((repository / model / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    return {key: value.string_value for key, value in config.parameters.items()}


def ort_session(path: Path, options=None):
    import onnxruntime as ort  # noqa: PLC0415

    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True, eq=False)
class SwapOutput:
    result: bytes  # PNG
    background: bytes  # PNG
    prepared: Prepared
    character: np.ndarray  # uint8 [h, w, 3] the diffusion's output (the person crop's frame)


class OnnxPipeline:
    """Sessions for the swap's graphs, and the swap itself as the served ensemble runs it."""

    def __init__(self, repository: Path, models: tuple[str, ...] = SWAP_MODELS,
                 options: Callable[[str], object] | None = None) -> None:
        """``options(model)`` overrides the session options (default: the model's config parameters)."""
        self.repository = Path(repository)
        self.sam = SamTransform()
        self.store = CharacterStore(self.repository)
        self.sessions = {}
        for model in models:
            opts = options(model) if options else session_options(config_parameters(self.repository, model))
            self.sessions[model] = ort_session(self.repository / model / C.MODEL_VERSION / C.ONNX_FILENAME,
                                               opts)

    def run(self, model: str, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[model].run(None, dict(feed))

    # -- the stages ------------------------------------------------------------------------------------------
    def encode(self, rgb: np.ndarray) -> np.ndarray:
        """SAM image embedding float32 [1, 256, 64, 64] of uint8 [H, W, 3] RGB."""
        return self.run(C.SAM_ENCODER_MODEL, {C.SAM_ENC_IN_IMAGE: self.sam.encoder_input(rgb)})[0]

    def decode(self, embeddings: np.ndarray, size: tuple[int, int], points: np.ndarray | None,
               labels: np.ndarray | None, box: np.ndarray | None = None, mask_input: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SAM decoder: (masks [1,1,H,W] logits, iou [1,1], low_res [1,1,256,256]) for clicks in pixels."""
        feed = self.sam.decoder_inputs(points, labels, box, size, mask_input=mask_input,
                                       embeddings=embeddings)
        masks, iou, low = self.run(C.SAM_DECODER_MODEL, feed)
        return masks, iou, low

    def lama(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.run(C.LAMA_MODEL, {C.LAMA_IN_IMAGE: image, C.LAMA_IN_MASK: mask})[0]

    def diffusion_callables(self, timer: StageTimer) -> dict[str, Callable]:
        def vae_encode(sample):
            return self.run(C.VAE_ENCODER_MODEL, {C.VAE_ENC_IN_SAMPLE: sample})[0]

        def unet(sample, timestep, hidden):
            feed = {C.UNET_IN_SAMPLE: sample, C.UNET_IN_TIMESTEP: timestep, C.UNET_IN_HIDDEN: hidden}
            return self.run(C.UNET_MODEL, feed)[0]

        def vae_decode(latent):
            return self.run(C.VAE_DECODER_MODEL, {C.VAE_DEC_IN_LATENT: latent})[0]

        return {"vae_encode": timer.wrap("vae_encoder", vae_encode), "unet": timer.wrap("unet_step", unet),
                "vae_decode": timer.wrap("vae_decoder", vae_decode)}

    def img2img(self, crop: np.ndarray, options: DiffusionOptions, timer: StageTimer,
                scheduler_cls: type | None = None,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """The served diffusion: the repository's scheduler (pipeline.json), or ``scheduler_cls``."""
        config = self.store.config
        cls = scheduler_cls or scheduler_class(config.scheduler)
        return img2img(crop, self.store.get(None).embeddings, options, **self.diffusion_callables(timer),
                       scheduler_config=config.scheduler_config, scaling_factor=config.scaling_factor,
                       progress=progress, scheduler_cls=cls)

    # -- the whole swap --------------------------------------------------------------------------------------
    def swap(self, image: bytes, click: tuple[float, float], options: DiffusionOptions, timer: StageTimer,
             progress: Callable[[int, int], None] | None = None, *, parallel: bool = True,
             silhouette: str = C.DEFAULT_SILHOUETTE) -> SwapOutput:
        """One swap as the ``isekai`` ensemble runs it; each stage's seconds go to ``timer``.

        ``parallel``: LaMa in a second thread beside the diffusion, as the ensemble runs them (onnxruntime
        runs outside the GIL, each session with its own thread pool, as each served model has); else one after
        the other. ``silhouette``: compose's source (``C.SILHOUETTE_SOURCES``): "sam" encodes the generated
        crop."""
        with timer("decode"):
            rgb = decode_image(image)
        points, labels = np.array([click], np.float32), np.array([1], np.int32)
        with timer("sam_encoder"):
            embeddings = self.encode(rgb)
        with timer("sam_decoder"):
            masks, _, _ = self.decode(embeddings, rgb.shape[:2], points, labels)
        with timer("prepare"):
            prepared = prepare_person(rgb, masks, points, labels)
            public_mask(masks)
        with ThreadPoolExecutor(1, thread_name_prefix="lama") as pool:
            lama = timer.wrap("lama", self.lama)
            pending = pool.submit(lama, prepared.lama_image, prepared.lama_mask) if parallel else None
            inpainted = None if parallel else lama(prepared.lama_image, prepared.lama_mask)
            if prepared.found:
                with timer("diffusion"):
                    character = self.img2img(prepared.person_image, options, timer, progress=progress)
            if pending is not None:
                inpainted = pending.result()
        if not prepared.found:  # a click on nothing: the photo comes back (the served stages do the same)
            with timer("compose"):
                encoded = encode_image(rgb, "png")
            return SwapOutput(encoded, encoded, prepared, prepared.person_image)
        logits = None  # compose's default: the person's own mask
        if silhouette == "sam":
            with timer("sam_encoder"):
                crop_embeddings = self.encode(character)
            with timer("sam_decoder"):
                logits, _, _ = self.decode(crop_embeddings, character.shape[:2], None, None,
                                           prepared.character_box)
        with timer("compose"):
            result, background = compose_scene(rgb, prepared.mask, prepared.hole, inpainted,
                                               prepared.lama_geometry, character, logits,
                                               prepared.person_geometry)
            encoded = encode_image(result, "png"), encode_image(background, "png")
        return SwapOutput(*encoded, prepared, character)


def person_clicks(repository: Path, scenes, cache_file: Path) -> dict[str, dict]:
    """Per scene, a click for which the exported SAM finds a person (:func:`bench.scenes.pick_click`); cached
    in ``cache_file`` per SAM graph, since it costs one encoder run per scene."""
    import json  # noqa: PLC0415

    from bench.scenes import pick_click  # noqa: PLC0415
    from bench.timing import say  # noqa: PLC0415

    graph = repository / C.SAM_ENCODER_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME
    stamp = f"{graph.resolve()}:{graph.stat().st_size}:{graph.stat().st_mtime_ns}"
    cached = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if cached.get("graph") != stamp:
        cached = {"graph": stamp, "scenes": {}}
    pipe = None
    for scene in scenes:
        if scene.name in cached["scenes"]:
            continue
        if pipe is None:
            pipe = OnnxPipeline(repository, models=(C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL))
        say(f"clicks: looking for a click where this SAM finds a person in the {scene.name} scene")
        embeddings = pipe.encode(scene.rgb)

        def finds(click, scene=scene, embeddings=embeddings, pipe=pipe) -> bool:
            points, labels = np.array([click], np.float32), np.array([1], np.int32)
            masks, _, _ = pipe.decode(embeddings, scene.size, points, labels)
            return prepare_person(scene.rgb, masks, points, labels).found

        click, tried = pick_click(scene, finds)
        found = finds(click)
        cached["scenes"][scene.name] = {"click": list(click), "tried": tried, "found": found}
        say(f"clicks: {scene.name}: click {click[0]:.0f},{click[1]:.0f} "
            f"({'finds a person' if found else 'finds nobody'}, {tried} tried)")
    cache_file.write_text(json.dumps(cached, indent=2))
    return {name: cached["scenes"][name] for name in (s.name for s in scenes)}


def crop_sizes(repository: Path, scenes) -> dict[str, dict]:
    """Per scene (at its click), the mask fraction and the crops this repository's SAM leads to: what the
    diffusion and LaMa of a configuration served from ``repository`` work on (one encode per scene)."""
    pipe = OnnxPipeline(repository, models=(C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL))
    out = {}
    for scene in scenes:
        points, labels = np.array([scene.click], np.float32), np.array([1], np.int32)
        masks, _, _ = pipe.decode(pipe.encode(scene.rgb), scene.size, points, labels)
        p = prepare_person(scene.rgb, masks, points, labels)
        out[scene.name] = {"found": p.found, "mask_fraction": float(p.mask.mean()),
                           "person_crop": list(p.person_image.shape[:2]),
                           "lama_input": list(p.lama_image.shape[2:])}
    return out
