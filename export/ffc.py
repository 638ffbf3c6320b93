"""LaMa's generator: the FFC-ResNet of "Resolution-robust Large Mask Inpainting with Fourier Convolutions".

Written for this project from the architecture of advimman/lama (``saicinpainting/training/modules/ffc.py``,
``FFCResNetGenerator``). Module and parameter names follow the official ones exactly, so the ``generator.*``
tensors of an official ``best.ckpt`` load with ``strict=True``::

    model.0                 ReflectionPad2d(3)
    model.1                 FFCBnAct 7x7, input_nc -> ngf (model.1.ffc.convl2l.weight, model.1.bn_l.*)
    model.2 .. model.{d+1}  FFCBnAct 3x3 stride 2, channels doubling (the last splits into local/global)
    then n_blocks           FFCResnetBlock (conv1, conv2: FFCBnAct whose convg2g is a SpectralTransform:
                            conv1.0/conv1.1 (1x1 conv + BN), fu.conv_layer/fu.bn (FourierUnit), [lfu.*],
                            conv2)
    then                    ConcatTupleLayer, d x (ConvTranspose2d, BatchNorm2d, ReLU), ReflectionPad2d(3),
                            Conv2d 7x7 ngf -> output_nc, the output activation (tanh, sigmoid or none)

A feature map travels between FFC layers as a pair ``(local, global)``: local channels see 3x3 convolutions,
global channels a :class:`SpectralTransform` whose :class:`FourierUnit` convolves in the 2-D Fourier domain,
so one layer's receptive field is the whole image. Either half may be absent (``None``) when its ratio is 0.

The Fourier unit computes its real 2-D DFT in one of two ways (:data:`DFT_MODES`): ``"fft"`` calls
``torch.fft.rfftn``/``irfftn`` (what the official code does; exported to ONNX as the ``DFT`` operator), and
``"matmul"`` multiplies by cos/sin matrices built from the runtime size (exported as plain MatMuls, and still
dynamic in H and W). Both give the same numbers to float32 rounding; see :func:`rfft2_matmul`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

# A (local, global) pair of NCHW float tensors; either may be None when that half has no channels.
Pair = tuple[torch.Tensor | None, torch.Tensor | None]

DFT_MODES = ("fft", "matmul")
GENERATOR_KIND = "ffc_resnet"
OUTPUT_ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
CONV_KWARGS = ("init_conv_kwargs", "downsample_conv_kwargs", "resnet_conv_kwargs")
# Per-layer options of the official FFC that this module implements; the others (gated, spatial_scale_factor,
# spectral_pos_encoding, use_se, ffc3d, ...) are not used by any released LaMa model and are refused.
SUPPORTED_CONV_OPTIONS = frozenset({"ratio_gin", "ratio_gout", "enable_lfu"})


# ---------------------------------------------------------------------------------------------------------
# The real 2-D DFT as matrix products (exportable as MatMul, dynamic in H and W).
# ---------------------------------------------------------------------------------------------------------
def _size(n: int, like: torch.Tensor) -> torch.Tensor:
    """A size as a 0-d int64 tensor.

    Under torch.export a size is symbolic, and the ONNX exporter cannot pass a symbolic Python scalar to every
    op (``remainder`` and ``eq`` by a scalar fail to translate): as a tensor it can.
    """
    return torch.ones((), dtype=torch.int64, device=like.device) * n


def _twiddles(rows: int, cols: int, period: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``2*pi*(j*k mod period)/period`` for j < rows, k < cols: two [rows, cols] matrices.

    The product is reduced modulo ``period`` in integers first, so the angle stays below 2*pi and float32
    keeps ~1e-7 relative precision even for 512-wide feature maps (j*k itself would reach 2.6e5).
    Sizes may be symbolic (torch.export): the matrices are then built inside the exported graph.
    """
    n = _size(period, like)
    j = torch.arange(rows, device=like.device)
    k = torch.arange(cols, device=like.device)
    turns = torch.remainder(j[:, None] * k[None, :], n).to(like.dtype) / n.to(like.dtype)
    phase = turns * (2 * math.pi)
    return torch.cos(phase), torch.sin(phase)


def _ortho_scale(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """1/sqrt(h*w) as a 0-d tensor (a tensor, not a Python float, so symbolic sizes stay symbolic)."""
    return torch.rsqrt((_size(h, like) * _size(w, like)).to(like.dtype))


def rfft2_matmul(x: torch.Tensor) -> torch.Tensor:
    """``torch.fft.rfftn(x, dim=(-2, -1), norm="ortho")`` as matrix products.

    Args:
        x: [N, C, H, W] float32, any H, W.

    Returns:
        [N, C, 2, H, W//2+1] float32: index 0 of dim 2 is the real part, 1 the imaginary part.

    The width transform keeps only the W//2+1 non-negative frequencies (the input is real), then a full
    complex DFT runs along the height: with C_H/S_H the cos/sin matrices,
    Z = [[C_H, S_H], [-S_H, C_H]] @ [Yr; Yi] on real and imaginary parts stacked along H, one batched MatMul.
    """
    h, w = x.shape[-2], x.shape[-1]
    cos_w, sin_w = _twiddles(w, w // 2 + 1, w, x)  # [W, Wr]
    cos_h, sin_h = _twiddles(h, h, h, x)  # [H, H], symmetric
    y = torch.cat((x @ cos_w, -(x @ sin_w)), dim=-2)  # [N, C, 2H, Wr]: e^{-i theta} along W
    forward_h = torch.cat((torch.cat((cos_h, sin_h), dim=1), torch.cat((-sin_h, cos_h), dim=1)), dim=0)
    z = (forward_h @ y) * _ortho_scale(h, w, x)  # [N, C, 2H, Wr]
    return z.unflatten(-2, (2, h))


def irfft2_matmul(z: torch.Tensor, width: int) -> torch.Tensor:
    """``torch.fft.irfftn(complex(re, im), s=(H, width), dim=(-2, -1), norm="ortho")`` as matrix products.

    Args:
        z: [N, C, 2, H, width//2+1] float32, real part at index 0 of dim 2, imaginary part at index 1.
        width: W of the signal, which the half spectrum alone cannot tell (W and W+1 share W//2+1).

    Returns:
        [N, C, H, width] float32.

    As torch (pocketfft/MKL) does for a c2r transform, the half spectrum is read as Hermitian: bins
    1..ceil(W/2)-1 count twice, the DC bin and (W even) the Nyquist bin once, and their imaginary parts
    drop out (their sine is 0).
    """
    h, half = z.shape[-2], z.shape[-1]
    cos_h, sin_h = _twiddles(h, h, h, z)
    inverse_h = torch.cat((torch.cat((cos_h, -sin_h), dim=1), torch.cat((sin_h, cos_h), dim=1)), dim=0)
    u = inverse_h @ z.flatten(-3, -2)  # [N, C, 2H, Wr]: e^{+i theta} along H
    cos_w, sin_w = _twiddles(half, width, width, z)  # [Wr, W]
    k = torch.arange(half, device=z.device)
    counts = 2 - (k == 0).to(z.dtype) - (2 * k == _size(width, z)).to(z.dtype)
    counts = counts[:, None]  # [Wr, 1]
    u_re, u_im = u[..., :h, :], u[..., h:, :]
    x = u_re @ (cos_w * counts) - u_im @ (sin_w * counts)
    return x * _ortho_scale(h, width, z)


# ---------------------------------------------------------------------------------------------------------
# The FFC building blocks.
# ---------------------------------------------------------------------------------------------------------
class FourierUnit(nn.Module):
    """1x1 convolution + BN + ReLU on the real 2-D spectrum of a feature map.

    Args of forward: x [N, C, H, W] float32 -> [N, C_out, H, W] float32.

    The spectrum enters the convolution as 2C channels interleaved per input channel (real of channel c at 2c,
    imaginary at 2c+1): the trained weights expect that order. ``dft`` ("fft" or "matmul", see
    :data:`DFT_MODES`; set it through :meth:`FFCResNetGenerator.set_dft`) picks how the DFT is computed.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_layer = nn.Conv2d(in_channels * 2, out_channels * 2, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels * 2)
        self.relu = nn.ReLU(inplace=True)
        self.dft = "fft"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        if self.dft == "matmul":
            spectrum = rfft2_matmul(x)  # [N, C, 2, H, Wr]
        else:
            complex_spectrum = torch.fft.rfftn(x, dim=(-2, -1), norm="ortho")
            spectrum = torch.stack((complex_spectrum.real, complex_spectrum.imag), dim=2)
        spectrum = spectrum.flatten(1, 2)  # [N, 2C, H, Wr], (re, im) interleaved per channel
        spectrum = self.relu(self.bn(self.conv_layer(spectrum)))
        spectrum = spectrum.unflatten(1, (-1, 2))  # [N, C_out, 2, H, Wr]
        if self.dft == "matmul":
            return irfft2_matmul(spectrum, w)
        complex_spectrum = torch.complex(spectrum[:, :, 0], spectrum[:, :, 1])
        return torch.fft.irfftn(complex_spectrum, s=(h, w), dim=(-2, -1), norm="ortho")


class SpectralTransform(nn.Module):
    """The global-to-global branch: (stride-2 avg pool), 1x1 conv to half width, Fourier unit(s), 1x1 conv.

    forward: x [N, C_in, H, W] -> [N, C_out, H/stride, W/stride].

    With ``enable_lfu`` a second, "local" Fourier unit sees the first quarter of the channels cut into 2x2
    spatial tiles stacked as channels, and its output is tiled back. As in the official code this needs
    square feature maps of even side; no released LaMa model enables it.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, enable_lfu: bool = True) -> None:
        super().__init__()
        self.enable_lfu = enable_lfu
        self.downsample = nn.AvgPool2d(kernel_size=2, stride=2) if stride == 2 else nn.Identity()
        half = out_channels // 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, half, kernel_size=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
        )
        self.fu = FourierUnit(half, half)
        if enable_lfu:
            self.lfu = FourierUnit(half, half)
        self.conv2 = nn.Conv2d(half, out_channels, kernel_size=1, bias=False)

    def _local_fourier(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        if h != w or h % 2:
            raise ValueError(
                f"the local Fourier unit (enable_lfu) needs square feature maps of even side, got {h}x{w}"
            )
        s = h // 2
        tiles = x[:, : c // 4]
        tiles = torch.cat((tiles[:, :, :s], tiles[:, :, s:]), dim=1)
        tiles = torch.cat((tiles[..., :s], tiles[..., s:]), dim=1)
        return self.lfu(tiles).repeat(1, 1, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.downsample(x))
        total = x + self.fu(x)
        if self.enable_lfu:
            total = total + self._local_fourier(x)
        return self.conv2(total)


class FFC(nn.Module):
    """Fast Fourier convolution: four branches between local and global channel groups.

    forward: (x_local [N, in_l, H, W] or None, x_global [N, in_g, H, W] or None)
        -> (local [N, out_l, H', W'] or None, global [N, out_g, H', W'] or None)

    ``int(channels * ratio)`` channels are global (the official rounding). l2l, l2g, g2l are ordinary
    convolutions with ``padding_mode`` padding; g2g is a :class:`SpectralTransform`. A branch whose input or
    output group is empty does not exist (and has no weights).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        ratio_gin: float,
        ratio_gout: float,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        enable_lfu: bool = True,
        padding_mode: str = "reflect",
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"FFC stride must be 1 or 2, got {stride}")
        in_g = int(in_channels * ratio_gin)
        in_l = in_channels - in_g
        out_g = int(out_channels * ratio_gout)
        out_l = out_channels - out_g
        self.ratio_gout = ratio_gout
        self.global_in_num = in_g

        def conv(cin: int, cout: int) -> nn.Module | None:
            if cin == 0 or cout == 0:
                return None
            return nn.Conv2d(
                cin, cout, kernel_size, stride, padding, dilation, bias=False, padding_mode=padding_mode
            )

        self.convl2l = conv(in_l, out_l)
        self.convl2g = conv(in_l, out_g)
        self.convg2l = conv(in_g, out_l)
        self.convg2g = SpectralTransform(in_g, out_g, stride, enable_lfu) if in_g and out_g else None

    @staticmethod
    def _sum(*parts: torch.Tensor | None) -> torch.Tensor | None:
        present = [p for p in parts if p is not None]
        if not present:
            return None
        total = present[0]
        for p in present[1:]:
            total = total + p
        return total

    @staticmethod
    def _apply(branch: nn.Module | None, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if branch is None or x is None else branch(x)

    def forward(self, x: Pair) -> Pair:
        x_l, x_g = x
        out_l = out_g = None
        # The official code decides by the ratio, not by the rounded channel counts; so do we.
        if self.ratio_gout != 1:
            out_l = self._sum(self._apply(self.convl2l, x_l), self._apply(self.convg2l, x_g))
        if self.ratio_gout != 0:
            out_g = self._sum(self._apply(self.convl2g, x_l), self._apply(self.convg2g, x_g))
        return out_l, out_g


class FFCBnAct(nn.Module):
    """FFC followed by BatchNorm and an activation on each of the local and global outputs.

    forward: a Pair, or a plain [N, C, H, W] tensor (all local) -> Pair. Official name: ``FFC_BN_ACT``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        ratio_gin: float,
        ratio_gout: float,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        activation: bool = True,
        enable_lfu: bool = True,
        padding_mode: str = "reflect",
    ) -> None:
        super().__init__()
        self.ffc = FFC(
            in_channels, out_channels, kernel_size, ratio_gin, ratio_gout, stride, padding, dilation,
            enable_lfu, padding_mode,
        )
        out_g = int(out_channels * ratio_gout)
        # Official: a BN exists for a half unless its ratio says the half is empty (a 0-channel BN can exist).
        self.bn_l = nn.BatchNorm2d(out_channels - out_g) if ratio_gout != 1 else None
        self.bn_g = nn.BatchNorm2d(out_g) if ratio_gout != 0 else None
        self.activation = activation

    def _post(self, bn: nn.Module | None, x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None or bn is None:
            return x
        x = bn(x)
        return torch.relu(x) if self.activation else x

    def forward(self, x: Pair | torch.Tensor) -> Pair:
        if isinstance(x, torch.Tensor):
            x = (x, None)
        out_l, out_g = self.ffc(x)
        return self._post(self.bn_l, out_l), self._post(self.bn_g, out_g)


class FFCResnetBlock(nn.Module):
    """Two 3x3 FFCBnAct layers with a residual connection on each half. forward: Pair -> Pair, same shapes."""

    def __init__(
        self, dim: int, ratio_gin: float, ratio_gout: float, enable_lfu: bool = True, dilation: int = 1
    ) -> None:
        super().__init__()
        options = dict(ratio_gin=ratio_gin, ratio_gout=ratio_gout, padding=dilation, dilation=dilation,
                       enable_lfu=enable_lfu)
        self.conv1 = FFCBnAct(dim, dim, 3, **options)
        self.conv2 = FFCBnAct(dim, dim, 3, **options)

    def forward(self, x: Pair) -> Pair:
        id_l, id_g = x
        y_l, y_g = self.conv2(self.conv1(x))
        return FFC._sum(id_l, y_l), FFC._sum(id_g, y_g)


class ConcatTupleLayer(nn.Module):
    """Pair -> one [N, C_l + C_g, H, W] tensor (local channels first)."""

    def forward(self, x: Pair) -> torch.Tensor:
        x_l, x_g = x
        if x_g is None:
            return x_l
        if x_l is None:
            return x_g
        return torch.cat((x_l, x_g), dim=1)


class FFCResNetGenerator(nn.Module):
    """LaMa's generator. forward: [N, input_nc, H, W] float32 -> [N, output_nc, H, W] float32.

    H and W must be multiples of ``2**n_downsampling`` (the upsampling restores exactly twice each size).
    For LaMa the input is the masked image (3 channels, 0..1) and the mask (1 channel) concatenated.
    """

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        ngf: int = 64,
        n_downsampling: int = 3,
        n_blocks: int = 9,
        init_conv_kwargs: Mapping[str, object] | None = None,
        downsample_conv_kwargs: Mapping[str, object] | None = None,
        resnet_conv_kwargs: Mapping[str, object] | None = None,
        add_out_act: bool | str = True,
        max_features: int = 1024,
    ) -> None:
        super().__init__()
        if n_blocks < 0 or n_downsampling < 0:
            raise ValueError(f"n_blocks and n_downsampling must be >= 0, got {n_blocks} and {n_downsampling}")
        init_kw = dict(init_conv_kwargs or {})
        down_kw = dict(downsample_conv_kwargs or {})
        res_kw = dict(resnet_conv_kwargs or {})
        self.n_downsampling = n_downsampling

        def width(n: float) -> int:
            return min(max_features, int(n))

        layers: list[nn.Module] = [nn.ReflectionPad2d(3), FFCBnAct(input_nc, ngf, 7, **_ffc_options(init_kw))]
        for i in range(n_downsampling):
            options = _ffc_options(down_kw)
            if i == n_downsampling - 1:
                # The last downsampling layer hands the resnet blocks their local/global split.
                options["ratio_gout"] = float(res_kw.get("ratio_gin", 0))
            mult = 2**i
            cin, cout = width(ngf * mult), width(ngf * mult * 2)
            layers.append(FFCBnAct(cin, cout, 3, stride=2, padding=1, **options))
        bottleneck = width(ngf * 2**n_downsampling)
        layers += [FFCResnetBlock(bottleneck, **_ffc_options(res_kw)) for _ in range(n_blocks)]
        layers.append(ConcatTupleLayer())
        for i in range(n_downsampling):
            mult = 2 ** (n_downsampling - i)
            cin, cout = width(ngf * mult), width(ngf * mult / 2)
            layers += [
                nn.ConvTranspose2d(cin, cout, kernel_size=3, stride=2, padding=1, output_padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7)]
        if add_out_act:
            name = "tanh" if add_out_act is True else add_out_act
            if name not in OUTPUT_ACTIVATIONS:
                raise ValueError(
                    f"add_out_act must be true, false or one of {sorted(OUTPUT_ACTIVATIONS)}, got {name!r}"
                )
            layers.append(OUTPUT_ACTIVATIONS[name]())
        self.model = nn.Sequential(*layers)

    def set_dft(self, mode: str) -> FFCResNetGenerator:
        """Choose how every Fourier unit computes its DFT: ``"fft"`` (torch.fft) or ``"matmul"``."""
        if mode not in DFT_MODES:
            raise ValueError(f"dft mode must be one of {DFT_MODES}, got {mode!r}")
        for module in self.modules():
            if isinstance(module, FourierUnit):
                module.dft = mode
        return self

    def uses_lfu(self) -> bool:
        return any(isinstance(m, SpectralTransform) and m.enable_lfu for m in self.modules())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _ffc_options(kwargs: Mapping[str, object]) -> dict[str, object]:
    """One ``*_conv_kwargs`` config mapping -> FFCBnAct keyword arguments (official defaults filled in)."""
    unknown = sorted(set(kwargs) - SUPPORTED_CONV_OPTIONS)
    if unknown:
        raise ValueError(f"unsupported FFC options {unknown}; supported: {sorted(SUPPORTED_CONV_OPTIONS)}")
    return {
        "ratio_gin": float(kwargs.get("ratio_gin", 0)),
        "ratio_gout": float(kwargs.get("ratio_gout", 0)),
        "enable_lfu": bool(kwargs.get("enable_lfu", True)),
    }


GENERATOR_OPTIONS = (
    "input_nc", "output_nc", "ngf", "n_downsampling", "n_blocks", "add_out_act", "max_features", *CONV_KWARGS,
)


def generator_from_config(config: Mapping[str, object]) -> FFCResNetGenerator:
    """Build the generator a LaMa training config's resolved ``generator`` section describes.

    Args:
        config: e.g. ``{"kind": "ffc_resnet", "input_nc": 4, "output_nc": 3, "ngf": 64, "n_downsampling": 3,
            "n_blocks": 18, "add_out_act": "sigmoid", "init_conv_kwargs": {...}, ...}`` with interpolations
            already resolved (see :func:`isekai.export.lama.load_lama_config`).
    """
    kind = config.get("kind")
    if kind != GENERATOR_KIND:
        raise ValueError(f"generator.kind is {kind!r}; only {GENERATOR_KIND!r} (LaMa, big-lama) is supported")
    unknown = sorted(set(config) - {"kind", *GENERATOR_OPTIONS})
    if unknown:
        raise ValueError(f"unsupported generator options {unknown}; supported: {sorted(GENERATOR_OPTIONS)}")
    missing = [k for k in ("input_nc", "output_nc") if k not in config]
    if missing:
        raise ValueError(f"generator section lacks {missing}")
    options = {k: config[k] for k in GENERATOR_OPTIONS if k in config}
    return FFCResNetGenerator(**options)
