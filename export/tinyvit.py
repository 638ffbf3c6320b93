"""TinyViT, MobileSAM's image encoder, written here (no timm, no torchvision) with the official tensor names.

MobileSAM (``mobile_sam.pt``) is segment-anything's ``Sam`` with this encoder in place of the ViT: the prompt
encoder and mask decoder are SAM's own, and the encoder keeps SAM's interface, ``image`` f32
[B, 3, 1024, 1024] (SAM-normalised, padded to the square) -> ``image_embeddings`` f32 [B, 256, 64, 64].

The architecture, as in MobileSAM's ``mobile_sam/modeling/tiny_vit_sam.py`` (``build_sam_vit_t``)::

    patch_embed  conv 3x3/2 (3 -> d0/2) + BN, GELU, conv 3x3/2 (-> d0) + BN                 1024 -> 256
    layers.0     MBConv blocks (1x1 expand x4, 3x3 depthwise, 1x1 project, residual),
                 then a patch merge                                                         256 -> 128
    layers.1..3  TinyViT blocks (window attention with learned per-offset biases, a 3x3 depthwise
                 conv, an MLP); a patch merge (1x1, 3x3 depthwise, 1x1) after each stage but
                 the last, stride 2 except the last one                                     128 -> 64
    neck         conv 1x1 (-> 256), LayerNorm2d, conv 3x3, LayerNorm2d                      at 64 x 64

MobileSAM: dims (64, 128, 160, 320), depths (2, 2, 6, 2), heads (4, 5, 10) and windows (7, 14, 7) in the
three attention stages. The official code takes 4-entry head and window lists whose first entry the conv stage
ignores; here they list the attention stages only. Every conv is followed by a BatchNorm (``Conv2d_BN``: keys
``c`` and ``bn``), applied with its running statistics (inference). The checkpoint also holds TinyViT's
ImageNet classifier (``norm_head``, ``head``), which SAM never runs: they are kept as modules so the file
loads strictly.

Deviations from the official code, none of which change a number:

* The official ``Attention`` caches its gathered biases (``ab``) when ``eval()`` is called, so biases loaded
  after ``eval()`` are ignored until the next ``eval()``; here they are gathered on every call (ONNX Runtime
  folds the gather of two constants at session creation, so the exported graph pays nothing).
* The official ``PatchMerging`` keeps the resolution (stride 1) when its output width is 320, 448 or 576,
  which in every released MobileSAM/TinyViT-SAM is the last merge; here the last merge keeps the resolution
  by position, which is what SAM's fixed 64 x 64 embedding needs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The patch embedding downsamples 4x, stage 0's and stage 1's merges 2x each: 1024 -> 64.
_PATCH_EMBED_STRIDE = 4
_NECK_CHANNELS = 256
_LAYER_NORM_2D_EPS = 1e-6  # segment-anything's LayerNorm2d default, as in the official neck


@dataclass(frozen=True)
class TinyViTConfig:
    """A TinyViT image encoder's architecture (the part that differs between checkpoints).

    ``embed_dims`` and ``depths`` have one entry per stage (stage 0 is the MBConv stage); ``num_heads`` and
    ``window_sizes`` one per attention stage (stages 1..). Window sizes are in tokens per side.
    """

    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_sizes: tuple[int, ...]
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3  # the depthwise conv between attention and MLP
    num_classes: int = 1000  # TinyViT's ImageNet head, in the checkpoint but unused by SAM

    def __post_init__(self) -> None:
        stages = len(self.embed_dims)
        if stages < 2 or len(self.depths) != stages:
            raise ValueError(
                f"TinyViT needs >= 2 stages with one depth each: dims {self.embed_dims}, depths {self.depths}"
            )
        if len(self.num_heads) != stages - 1 or len(self.window_sizes) != stages - 1:
            raise ValueError(
                f"TinyViT: {stages - 1} attention stages need as many heads and window sizes, got "
                f"heads {self.num_heads}, windows {self.window_sizes}"
            )
        for dim, heads in zip(self.embed_dims[1:], self.num_heads, strict=True):
            if dim % heads:
                raise ValueError(f"TinyViT: stage width {dim} is not a multiple of its {heads} heads")

    def summary(self) -> str:
        return f"TinyViT dims {list(self.embed_dims)}, depths {list(self.depths)}"

    def describe(self) -> str:
        return (
            f"{self.summary()}, heads {list(self.num_heads)}, windows {list(self.window_sizes)}"
        )

    def resolutions(self, image_size: int) -> tuple[int, ...]:
        """Tokens per side of each stage for a square ``image_size``: /4, then /2 per merge but the last."""
        side = image_size // _PATCH_EMBED_STRIDE
        sides = [side]
        for stage in range(1, len(self.embed_dims)):
            if stage < len(self.embed_dims) - 1:
                side = (side + 1) // 2  # 3x3 stride-2 conv with padding 1
            sides.append(side)
        return tuple(sides)


class Conv2dBN(nn.Sequential):
    """A bias-free conv followed by a BatchNorm (inference statistics); official keys ``c.*`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class PatchEmbed(nn.Module):
    """[B, 3, S, S] -> [B, d0, S/4, S/4]: two stride-2 3x3 convs."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(3, dim // 2, 3, 2), nn.GELU(), Conv2dBN(dim // 2, dim, 3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual on [B, C, H, W]: 1x1 expand, 3x3 depthwise, 1x1 project, + input, GELU."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, dim)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.act3(y + x)


class PatchMerging(nn.Module):
    """Tokens [B, H*W, C] (or a map [B, C, H, W]) -> tokens [B, H'*W', C']: 1x1, 3x3 depthwise (stride 2, or 1
    for the last merge, which keeps SAM's 64 x 64), 1x1, GELU between."""

    def __init__(self, resolution: int, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            b, _, c = x.shape
            x = x.view(b, self.resolution, self.resolution, c).permute(0, 3, 1, 2)
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


def attention_bias_index(window: int) -> torch.Tensor:
    """[window², window²] int64: for each (query, key) token pair of a window, the index of their offset
    (|dy|, |dx|) in the order the official code first meets it (row-major pairs), i.e. columns of
    ``attention_biases``. There are window² distinct offsets."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    index = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            index.append(offsets.setdefault(offset, len(offsets)))
    n = len(points)
    return torch.tensor(index, dtype=torch.int64).view(n, n)


class Attention(nn.Module):
    """Multi-head self-attention within one window, [B', N, C] -> [B', N, C] with N = window².

    LayerNorm first; ``qkv`` is laid out per head as [q | k | v] (the official layout, not all q, all k, all
    v); a learned bias per head and token offset is added to the scaled scores.
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", attention_bias_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=3))  # each [B', heads, N, d]
        bias = self.attention_biases[:, self.attention_bias_idxs]  # [heads, N, N]
        attn = ((q @ k.transpose(-2, -1)) * self.scale + bias).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """LayerNorm, Linear, GELU, Linear on [B, N, C]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Tokens [B, R*R, C] -> same: window attention (+ residual), a depthwise conv on the map, an MLP
    (+ residual).

    Windows tile the R x R map from the top left; the map is zero-padded at the bottom/right to a multiple of
    the window first, and the padded tokens take part in the attention as the official code does (no mask),
    then are dropped. A map no bigger than one window is attended as a whole."""

    def __init__(
        self, dim: int, resolution: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, groups=dim)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        r, w = self.resolution, self.window
        b, n, c = x.shape
        if r == w:
            return self.attn(x)
        pad = (w - r % w) % w
        x = F.pad(x.view(b, r, r, c), (0, 0, 0, pad, 0, pad))
        side, count = r + pad, (r + pad) // w
        x = x.view(b, count, w, count, w, c).transpose(2, 3).reshape(b * count * count, w * w, c)
        x = self.attn(x)
        x = x.view(b, count, count, w, w, c).transpose(2, 3).reshape(b, side, side, c)
        return x[:, :r, :r].reshape(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        x = x + self._window_attention(x)
        r = self.resolution
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, r, r)).view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks on the map [B, C, H, W], then a patch merge to tokens."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class BasicLayer(nn.Module):
    """An attention stage: TinyViT blocks on tokens [B, R*R, C], then a patch merge unless it is the last."""

    def __init__(self, blocks: list[TinyViTBlock], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of [B, C, H, W] (segment-anything's, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = _LAYER_NORM_2D_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class TinyViT(nn.Module):
    """MobileSAM's image encoder: ``image`` f32 [B, 3, S, S] (S = ``img_size``, SAM-normalised) ->
    ``image_embeddings`` f32 [B, 256, S/16, S/16]."""

    def __init__(self, config: TinyViTConfig, img_size: int = 1024) -> None:
        super().__init__()
        self.config = config
        self.img_size = img_size  # segment-anything's Sam.preprocess and SamOnnxModel read it
        dims, sides = config.embed_dims, config.resolutions(img_size)
        last = len(dims) - 1
        self.patch_embed = PatchEmbed(dims[0])
        self.layers = nn.ModuleList()
        for stage, (dim, depth, side) in enumerate(zip(dims, config.depths, sides, strict=True)):
            merge = None
            if stage < last:
                merge = PatchMerging(side, dim, dims[stage + 1], stride=1 if stage + 1 == last else 2)
            if stage == 0:
                self.layers.append(ConvLayer(dim, depth, config.mbconv_expand_ratio, merge))
                continue
            heads, window = config.num_heads[stage - 1], config.window_sizes[stage - 1]
            blocks = [
                TinyViTBlock(dim, side, heads, window, config.mlp_ratio, config.local_conv_size)
                for _ in range(depth)
            ]
            self.layers.append(BasicLayer(blocks, merge))
        self.embedding_side = sides[-1]
        self.norm_head = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], config.num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], _NECK_CHANNELS, kernel_size=1, bias=False),
            LayerNorm2d(_NECK_CHANNELS),
            nn.Conv2d(_NECK_CHANNELS, _NECK_CHANNELS, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(_NECK_CHANNELS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        side = self.embedding_side
        return self.neck(x.view(b, side, side, c).permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------------------
# Reading the architecture from a checkpoint's tensors.
# ---------------------------------------------------------------------------------------------------------
# The tensor that marks a TinyViT encoder in a SAM state dict (the ViT's is patch_embed.proj.weight).
TINYVIT_MARKER = "patch_embed.seq.0.c.weight"


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children ``prefix<i>.`` the state dict has; they must be 0..n-1."""
    found = sorted({int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)})
    if found != list(range(len(found))):
        raise ValueError(f"{prefix}*: children are not numbered 0..n-1: {found}")
    return len(found)


def infer_tinyvit_config(state: Mapping[str, torch.Tensor], prefix: str = "image_encoder.") -> TinyViTConfig:
    """The architecture from tensor shapes; raises ValueError naming the tensor that does not fit.

    Widths: stage 0 from its first MBConv's input, stages 1.. from their first block's qkv; depths: blocks per
    stage; heads: rows of ``attention_biases``; windows: the square root of its columns (a w x w window has w²
    distinct offsets); ratios from the hidden widths.
    """

    def shape(key: str) -> tuple[int, ...]:
        if prefix + key not in state:
            raise ValueError(f"{prefix}{key} is missing (TinyViT encoders have it)")
        return tuple(state[prefix + key].shape)

    stages = _count(state, f"{prefix}layers.")
    dims, depths, heads, windows = [], [], [], []
    for stage in range(stages):
        depths.append(_count(state, f"{prefix}layers.{stage}.blocks."))
        if depths[-1] == 0:
            raise ValueError(f"{prefix}layers.{stage} has no blocks")
        if stage == 0:
            dims.append(shape("layers.0.blocks.0.conv1.c.weight")[1])
            continue
        dims.append(shape(f"layers.{stage}.blocks.0.attn.qkv.weight")[1])
        rows, offsets = shape(f"layers.{stage}.blocks.0.attn.attention_biases")
        window = math.isqrt(offsets)
        if window * window != offsets:
            raise ValueError(
                f"{prefix}layers.{stage}.blocks.0.attn.attention_biases has {offsets} columns, "
                "not the square of a window size"
            )
        heads.append(rows)
        windows.append(window)
    return TinyViTConfig(
        embed_dims=tuple(dims),
        depths=tuple(depths),
        num_heads=tuple(heads),
        window_sizes=tuple(windows),
        mlp_ratio=shape("layers.1.blocks.0.mlp.fc1.weight")[0] / dims[1],
        mbconv_expand_ratio=shape("layers.0.blocks.0.conv1.c.weight")[0] / dims[0],
        local_conv_size=shape("layers.1.blocks.0.local_conv.c.weight")[-1],
        num_classes=shape("head.weight")[0],
    )
