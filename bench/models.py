"""The benchmark's checkpoints and exported model repository, made once and cached.

Two profiles:

- ``full``: the real architectures at full size with random weights (they cost the same to run as trained
  ones): SAM vit_h (or vit_b), big-lama (ngf 64, 18 FFC blocks), Stable Diffusion 1.5. Made by the project's
  own checkpoint makers in the real on-disk formats and exported by the project's own exporters, exactly as
  ``isekai export`` does.
- ``quick``: the small checkpoints the tests and the demo use (``isekai export demo``), for a smoke run.

Layout under the cache folder (default ``.cache/bench/<profile>``)::

    checkpoints/    sam_<type>.pth, big-lama/ (config.yaml, models/best.ckpt), sd/ (a diffusers folder)
    graphs/<part>/  one exporter's output as a repository fragment (<model>/1/model.onnx ...), plus ``.done``;
                    SAM's is ``sam_<type>`` (TinyViT) or ``sam_<type>-rows<N>`` (a ViT, its global attention
                    exported N query rows at a time: a graph made with another N is another part)
    repository-<sam type>/   the Triton repository: configs copied from model_repository/, graphs hard-linked
    repository-<sam type>-unet-attention-none/   the same with the UNet's attention as diffusers runs it
                    (graphs/unet-attention-none: bench/server_memory.py's "before")
    lama-fft-onnx.onnx       the LaMa graph exported with the ONNX DFT operator (the FFT lever)

Re-running skips every checkpoint and export that exists (an export counts once its ``.done`` marker is
written), so only the first full run pays the export (SD 1.5: ~80 s and a 3.4 GB UNet).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from isekai import constants as C
from isekai.export.common import progress

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / ".cache" / "bench"

# The big-lama architecture (the official config's generator section).
BIG_LAMA = {"ngf": 64, "n_blocks": 18}
SD_MODELS = (C.TEXT_ENCODER_MODEL, C.UNET_MODEL, C.VAE_ENCODER_MODEL, C.VAE_DECODER_MODEL)
SAM_MODELS = (C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL)


@dataclass(frozen=True)
class Checkpoints:
    """Where the checkpoints the baseline loads and the exporters read are."""

    sam: Path  # a SAM .pth (plain state_dict)
    lama_checkpoint: Path  # big-lama models/best.ckpt
    lama_config: Path  # big-lama config.yaml
    sd: Path  # a diffusers SD 1.x folder

    @classmethod
    def in_folder(cls, folder: Path, sam_type: str) -> Checkpoints:
        """The names :func:`prepare` writes (and the demo's, for ``tiny``)."""
        folder = Path(folder)
        if sam_type == "tiny":
            return cls(folder / "sam_tiny.pth", folder / "lama-small" / "models" / "best.ckpt",
                       folder / "lama-small" / "config.yaml", folder / "sd-tiny")
        return cls(folder / f"sam_{sam_type}.pth", folder / "big-lama" / "models" / "best.ckpt",
                   folder / "big-lama" / "config.yaml", folder / "sd15")


@dataclass(frozen=True)
class BenchModels:
    """Everything the phases need: checkpoints, the exported repository and the extra LaMa graph."""

    profile: str  # "full" or "quick"
    sam_type: str  # vit_h, vit_b, ... or tiny
    checkpoints: Checkpoints
    repository: Path
    lama_fft_onnx: Path | None  # LaMa exported with fft="onnx" (None until the lever asks for it)

    def onnx_path(self, model: str) -> Path:
        return self.repository / model / C.MODEL_VERSION / C.ONNX_FILENAME

    def weight_bytes(self, models: tuple[str, ...] = C.ONNX_MODELS) -> int:
        """Bytes of the exported graphs (external data included): the weights the server loads."""
        total = 0
        for model in models:
            folder = self.repository / model / C.MODEL_VERSION
            total += sum(p.stat().st_size for p in folder.glob(f"{C.ONNX_FILENAME}*") if p.is_file())
        return total


def _done(folder: Path) -> bool:
    return (folder / ".done").is_file()


def _mark_done(folder: Path) -> None:
    (folder / ".done").write_text("exported\n")


def _export_part(folder: Path, export) -> Path:
    """Run ``export(folder)`` unless a previous run finished it; an interrupted one starts over."""
    if _done(folder):
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    export(folder)
    _mark_done(folder)
    return folder


def _link_tree(source: Path, destination: Path) -> None:
    """Hard-link every file of ``source`` into ``destination`` (same layout), replacing what is there."""
    for path in source.rglob("*"):
        if path.is_dir() or path.name == ".done":
            continue
        target = destination / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(path, target)
        except OSError:  # another file system
            shutil.copy2(path, target)


def sam_part_name(sam_type: str, rows: int = C.SAM_ATTENTION_QUERY_ROWS) -> str:
    """The graphs folder of one SAM export (see the module docstring)."""
    from isekai.export.make_sam import SAM_ENCODERS, SamEncoderConfig  # noqa: PLC0415 - torch-heavy

    vit = isinstance(SAM_ENCODERS[sam_type], SamEncoderConfig)
    return f"sam_{sam_type}-rows{rows}" if vit else f"sam_{sam_type}"


def sam_graphs(root: Path, sam_type: str, rows: int = C.SAM_ATTENTION_QUERY_ROWS) -> Path:
    """The exported SAM graphs of ``sam_type`` as a repository fragment under ``root/graphs``, made (with
    their random-weight checkpoint ``root/checkpoints/sam_<type>.pth``) when missing."""
    from isekai.export.make_sam import make_sam_checkpoint  # noqa: PLC0415
    from isekai.export.sam import export_sam  # noqa: PLC0415

    checkpoint = Path(root) / "checkpoints" / f"sam_{sam_type}.pth"
    if not checkpoint.exists():
        progress(f"making a random-weight SAM {sam_type} checkpoint {checkpoint}")
        make_sam_checkpoint(checkpoint, model_type=sam_type)
    return _export_part(Path(root) / "graphs" / sam_part_name(sam_type, rows),
                        lambda d: export_sam(checkpoint, sam_type, repository=d, attention_rows=rows))


def segment_repository(root: Path, sam_type: str) -> Path:
    """A Triton repository for the click path alone: every config, and only ``sam_type``'s SAM graphs (made
    when missing). Serve it with explicit model control loading ``isekai_segment`` and the models preprocess
    calls (``sam_encoder``, ``embedding_cache``)."""
    from isekai.export.demo import copy_configs  # noqa: PLC0415

    repo = Path(root) / f"repository-segment-{sam_type}"
    copy_configs(repo)
    _link_tree(sam_graphs(root, sam_type), repo)
    return repo


def unet_variant_repository(models: BenchModels, cache: Path, attention_slicing: str) -> Path:
    """``models``' repository with its UNet exported with another ``attention_slicing`` (the server-memory
    lever): ``repository-<sam type>-unet-attention-<slicing>`` beside it, every file hard-linked but the
    UNet's, which comes from its own export part ``graphs/unet-attention-<slicing>``."""
    from isekai.export.sd import export_graphs, load_sd  # noqa: PLC0415

    if attention_slicing == C.SD_ATTENTION_SLICING:
        return models.repository
    root = Path(cache) / models.profile

    def export_unet(folder: Path) -> None:  # as export_sd exports it (LoRA slots included), the UNet only
        graph = folder / C.UNET_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME
        graph.parent.mkdir(parents=True, exist_ok=True)
        export_graphs(load_sd(models.checkpoints.sd), {C.UNET_MODEL: graph}, C.DEFAULT_LORA_TARGETS,
                      attention_slicing)

    part = _export_part(root / "graphs" / f"unet-attention-{attention_slicing}", export_unet)
    repo = root / f"repository-{models.sam_type}-unet-attention-{attention_slicing}"
    _link_tree(models.repository, repo)
    _link_tree(part / C.UNET_MODEL, repo / C.UNET_MODEL)
    return repo


def make_checkpoints(folder: Path, sam_type: str) -> Checkpoints:
    """Make the full-size random-weight checkpoints that are missing in ``folder``."""
    from isekai.export.make_lama import make_lama_checkpoint  # noqa: PLC0415 - torch-heavy
    from isekai.export.make_sam import make_sam_checkpoint  # noqa: PLC0415
    from isekai.export.make_sd import make_sd_folder  # noqa: PLC0415

    ckpt = Checkpoints.in_folder(folder, sam_type)
    if not ckpt.sam.exists():
        progress(f"making a random-weight SAM {sam_type} checkpoint {ckpt.sam}")
        make_sam_checkpoint(ckpt.sam, model_type=sam_type)
    if not ckpt.lama_checkpoint.exists():
        progress(f"making a random-weight big-lama checkpoint {ckpt.lama_checkpoint.parent.parent}")
        make_lama_checkpoint(ckpt.lama_checkpoint.parent.parent, **BIG_LAMA)
    if not (ckpt.sd / "model_index.json").exists():
        progress(f"making a random-weight Stable Diffusion 1.5 folder {ckpt.sd}")
        if ckpt.sd.exists():
            shutil.rmtree(ckpt.sd)
        make_sd_folder(ckpt.sd, size="sd15")
    return ckpt


def prepare(profile: str, sam_type: str, cache: Path = DEFAULT_CACHE, *, repository: Path | None = None,
            checkpoints: Path | None = None) -> BenchModels:
    """Checkpoints and an exported repository for ``profile``, made or found in ``cache / profile``.

    ``repository`` and ``checkpoints`` (both or neither) use an existing exported repository and the
    checkpoints it was exported from instead (the smoke test passes the test suite's small-checkpoint
    repository).
    """
    from isekai.export.demo import build_demo_repository, copy_configs  # noqa: PLC0415

    root = Path(cache) / profile
    if (repository is None) != (checkpoints is None):
        raise ValueError("give both --repository and --checkpoints, or neither")
    if repository is not None:
        return BenchModels(profile, sam_type, Checkpoints.in_folder(checkpoints, sam_type), Path(repository),
                           None)
    if profile == "quick":
        repo = build_demo_repository(root / "model_repository", root / "checkpoints")
        return BenchModels(profile, "tiny", Checkpoints.in_folder(root / "checkpoints", "tiny"), repo, None)
    if profile != "full":
        raise ValueError(f"profile must be 'full' or 'quick', not {profile!r}")

    from isekai.export.lama import export_lama  # noqa: PLC0415
    from isekai.export.sd import export_sd  # noqa: PLC0415

    ckpt = make_checkpoints(root / "checkpoints", sam_type)
    graphs = root / "graphs"
    sam_part = sam_graphs(root, sam_type)
    lama_part = _export_part(graphs / "lama",
                             lambda d: export_lama(ckpt.lama_checkpoint, ckpt.lama_config, repository=d))
    sd_part = _export_part(graphs / "sd15", lambda d: export_sd(ckpt.sd, repository=d))

    repo = root / f"repository-{sam_type}"
    copy_configs(repo)
    for part in (sam_part, lama_part, sd_part):
        _link_tree(part, repo)
    return BenchModels(profile, sam_type, ckpt, repo, None)


def lama_fft_onnx(models: BenchModels, cache: Path = DEFAULT_CACHE) -> Path:
    """The LaMa graph exported with the ONNX DFT operator (``--fft onnx``), for the FFT lever; cached."""
    from isekai.export.lama import export_lama  # noqa: PLC0415

    folder = Path(cache) / models.profile / "graphs" / "lama-fft-onnx"
    part = _export_part(folder, lambda d: export_lama(models.checkpoints.lama_checkpoint,
                                                      models.checkpoints.lama_config,
                                                      output=d / C.ONNX_FILENAME, fft="onnx"))
    return part / C.ONNX_FILENAME


# --- the fast path (issue 15): MobileSAM (vit_t) and an LCM-LoRA fused into SD, served
# ---------------------------
FAST_SAM = {"full": "vit_t", "quick": "tiny_t"}  # tiny_t: MobileSAM's TinyViT at test size
# The published LCM-LoRA for SD 1.5 is rank 64 on every conv and linear layer it adapts; random weights of
# that shape cost what it costs (fused, nothing per step).
FAST_LCM_RANK = {"full": 64, "quick": 8}


def fast_sam_available(profile: str) -> str | None:
    """None when the fast path's SAM can be made here, else why not (the clear note the report shows)."""
    from isekai.export.make_sam import SAM_ENCODERS  # noqa: PLC0415 - torch-heavy

    sam_type = FAST_SAM[profile]
    if sam_type not in SAM_ENCODERS:
        return (f"skipped: SAM {sam_type} (MobileSAM) is not exportable by this version of isekai "
                "(export/make_sam.py has no such architecture yet)")
    return None


def prepare_fast(profile: str, cache: Path = DEFAULT_CACHE, *, base_repository: Path | None = None,
                 checkpoints: Path | None = None, repository: Path | None = None) -> BenchModels:
    """The fast path's repository: SAM ``FAST_SAM[profile]``, the same LaMa, and the same SD folder exported
    with a random LCM-LoRA-shaped LoRA fused (``isekai export sd --lcm-lora``), made once in ``cache /
    profile``.

    ``repository`` uses an exported LCM repository as it is (the smoke test passes the test suite's).
    ``quick`` builds on ``base_repository`` (the quick repository: its LaMa) and ``checkpoints`` (its tiny SD
    folder).
    """
    from isekai.export.demo import DEMO_LCM_ALPHA, build_lcm_repository, copy_configs, make_lcm_lora  # noqa: PLC0415
    from isekai.export.sd import export_sd  # noqa: PLC0415

    root = Path(cache) / profile
    sam_type = FAST_SAM[profile]
    if repository is not None:
        return BenchModels(profile, "as exported", Checkpoints.in_folder(checkpoints or root, "tiny"),
                           Path(repository), None)
    if profile == "quick":
        ckpt_folder = Path(checkpoints) if checkpoints else root / "checkpoints"
        repo = build_lcm_repository(root / "repository-fast", Path(base_repository), ckpt_folder,
                                    sam=sam_graphs(root, sam_type))
        return BenchModels(profile, sam_type, Checkpoints.in_folder(ckpt_folder, "tiny"), repo, None)
    from isekai.export.lama import export_lama  # noqa: PLC0415

    ckpt = Checkpoints.in_folder(Path(checkpoints) if checkpoints else root / "checkpoints", sam_type)
    graphs = root / "graphs"
    lora = root / "checkpoints" / f"lcm-lora-sd15-rank{FAST_LCM_RANK[profile]}.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    if not lora.exists():
        progress(f"making a random LCM-LoRA-shaped LoRA (rank {FAST_LCM_RANK[profile]}) {lora}")
        make_lcm_lora(ckpt.sd, lora, rank=FAST_LCM_RANK[profile], alpha=DEMO_LCM_ALPHA)
    sam_part = sam_graphs(root, sam_type)
    lama_part = _export_part(graphs / "lama",
                             lambda d: export_lama(ckpt.lama_checkpoint, ckpt.lama_config, repository=d))
    sd_part = _export_part(graphs / f"sd15-lcm-rank{FAST_LCM_RANK[profile]}",
                           lambda d: export_sd(ckpt.sd, repository=d, lcm_lora=lora))
    repo = root / f"repository-fast-{sam_type}"
    copy_configs(repo)
    for part in (sam_part, lama_part, sd_part):
        _link_tree(part, repo)
    return BenchModels(profile, sam_type, ckpt, repo, None)


def fast_models(cfg: dict) -> BenchModels:
    """The fast path's models for a phase's config (``cfg["fast"]``, written by bench.cli)."""
    fast = cfg["fast"]
    def path(key: str) -> Path | None:
        return Path(fast[key]) if fast.get(key) else None

    return prepare_fast(cfg["profile"], Path(cfg["cache"]), base_repository=path("base_repository"),
                        checkpoints=path("checkpoints"), repository=path("repository"))
