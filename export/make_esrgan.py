"""Random-weight Real-ESRGAN checkpoints in the official on-disk format (tests, the demo, benchmarks).

The released ``RealESRGAN_x4plus.pth`` and its siblings are ``torch.save({"params_ema": state_dict})`` of
RRDBNet; :func:`make_esrgan_checkpoint` writes the same (or, for a ``.safetensors`` path, the bare state dict
as safetensors), so the exporter reads ours and the official files through one code path. ``x4plus``,
``x4plus_anime_6B`` and ``x2plus`` are the official architectures at full size (random weights cost the same
to run); ``tiny`` keeps every part of the network (dense blocks, both upsampling stages) at a size tests and
the demo run in a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from isekai.export.esrgan import (
    OFFICIAL_ARCHITECTURES,
    PARAMS_KEYS,
    SAFETENSORS_SUFFIX,
    ResidualDenseBlock,
    RRDBConfig,
    RRDBNet,
)

VARIANTS: dict[str, RRDBConfig] = {
    "x4plus": OFFICIAL_ARCHITECTURES["RealESRGAN_x4plus"],
    "x4plus_anime_6B": OFFICIAL_ARCHITECTURES["RealESRGAN_x4plus_anime_6B"],
    "x2plus": OFFICIAL_ARCHITECTURES["RealESRGAN_x2plus"],
    "tiny": RRDBConfig(num_block=2, num_feat=16, num_grow_ch=8, scale=4),
}
# BasicSR initialises the dense blocks' convolutions at 0.1 x Kaiming so 23 residual blocks stay stable; the
# random checkpoints do the same, which keeps their activations in the range of a trained network's.
DENSE_INIT_SCALE = 0.1
BIAS_STD = 0.01  # non-zero biases, so a graph that dropped them would fail parity
# The output is spread to this mean and spread on a random image, like a trained model's 0..1 pixels: with
# default init it is ~1e-2 wide, and a 1e-4 parity tolerance could not tell a broken graph from a good one.
OUTPUT_MEAN, OUTPUT_STD = 0.5, 0.25
_PROBE_SIZE = 16


def _randomize(model: RRDBNet, rng: torch.Generator) -> None:
    """Kaiming-normal weights (x0.1 inside dense blocks) and small random biases, drawn from ``rng``."""
    dense = {id(conv) for block in model.modules() if isinstance(block, ResidualDenseBlock)
             for conv in block.children()}
    for conv in model.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        std = nn.init.calculate_gain("leaky_relu", 0.2) / fan_in**0.5
        scale = DENSE_INIT_SCALE if id(conv) in dense else 1.0
        conv.weight.data = torch.randn(conv.weight.shape, generator=rng) * std * scale
        conv.bias.data = torch.randn(conv.bias.shape, generator=rng) * BIAS_STD


def _spread_output(model: RRDBNet, rng: torch.Generator) -> None:
    """Rescale conv_last so a random image's output has OUTPUT_MEAN and OUTPUT_STD (see above)."""
    side = _PROBE_SIZE * model.config.unshuffle
    probe = torch.rand((1, 3, side, side), generator=rng)
    with torch.no_grad():
        out = model.eval()(probe)
    std = float(out.std())
    gain = OUTPUT_STD / std if std > 0 else 1.0
    model.conv_last.weight.data *= gain
    model.conv_last.bias.data = (model.conv_last.bias.data - out.mean(dim=(0, 2, 3))) * gain + OUTPUT_MEAN


def random_esrgan(config: RRDBConfig, seed: int = 0) -> RRDBNet:
    """An RRDBNet of this architecture with reproducible random weights, in eval mode."""
    rng = torch.Generator().manual_seed(seed)
    model = RRDBNet(config)
    _randomize(model, rng)
    _spread_output(model, rng)
    return model.eval()


def make_esrgan_checkpoint(
    path: str | Path,
    variant: str = "tiny",
    *,
    num_block: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-weight Real-ESRGAN checkpoint; return its path.

    Args:
        path: ``*.pth`` -> ``torch.save({"params_ema": state_dict})`` as the official files;
            ``*.safetensors`` -> the state dict itself.
        variant: one of :data:`VARIANTS` (``x4plus``, ``x4plus_anime_6B``, ``x2plus``: official sizes).
        num_block: override the variant's RRDB count (a shallower network of the same shape, for fast tests).
        seed: the same seed writes the same tensors.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {sorted(VARIANTS)}")
    config = VARIANTS[variant]
    if num_block is not None:
        config = RRDBConfig(num_block, config.num_feat, config.num_grow_ch, config.scale)
    state = {k: v.detach().clone().contiguous() for k, v in random_esrgan(config, seed).state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == SAFETENSORS_SUFFIX:
        save_file(state, str(path))
    else:
        torch.save({PARAMS_KEYS[0]: state}, path)
    return path
