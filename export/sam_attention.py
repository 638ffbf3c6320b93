"""SAM's global attention for export, computed a block of query rows at a time: same numbers, smaller buffers.

segment-anything's image encoder attends over the whole 64 x 64 token map in its global blocks (4 of them in
every ViT SAM). Its ``Attention.forward`` materialises the scores of every head for every (query, key) pair at
once: [B * heads, 4096, 4096] f32 = 1 GiB for vit_h's 16 heads, and the decomposed relative positions add two
more tensors of that size before the softmax makes a third. Exported as is, onnxruntime needs ~4 GB of buffers
for one block.

:class:`BlockedGlobalAttention` computes the same thing for ``rows`` query rows of the map (``rows * 64``
queries) at a time, against all keys, and concatenates the results. Each query's softmax still sees every key,
so nothing is rescaled (this is not flash attention's running softmax): every output is the same arithmetic as
the original, in another blocking of the matmuls. The loop runs in Python at export time, so the graph has no
loop operator: 64 / rows copies of (matmul, two broadcast adds, softmax, matmul), each with a
[B * heads, rows * 64, 4096] intermediate that is freed before the next block's is allocated.

Windowed blocks (14 x 14 windows) are left as they are: their scores are 196 x 196 per window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from isekai.export.sam_import import ImageEncoderViT, modeling

_image_encoder = modeling.image_encoder  # segment_anything.modeling.image_encoder: Attention, get_rel_pos


class BlockedGlobalAttention(nn.Module):
    """segment-anything's ``Attention`` (relative positions) on a whole map, ``rows`` query rows at a time.

    Holds the original module (and so its weights): x [B, H, W, C] f32 -> [B, H, W, C] f32, as the original.
    """

    def __init__(self, attention: nn.Module, rows: int) -> None:
        super().__init__()
        if not attention.use_rel_pos:
            raise ValueError("BlockedGlobalAttention expects SAM's attention with relative positions")
        if rows < 1:
            raise ValueError(f"query rows per block should be >= 1 but is {rows}")
        self.attention = attention
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention
        b, h, w, _ = x.shape
        heads = a.num_heads
        # As the original: q, k, v [B * heads, H * W, d].
        qkv = a.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
        bh, _, d = q.shape
        # The decomposed relative positions for every query: [B * heads, H, W, H] and [.., W] (64 x smaller
        # than the scores), sliced per block below.
        r_q = q.reshape(bh, h, w, d)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, _image_encoder.get_rel_pos(h, h, a.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, _image_encoder.get_rel_pos(w, w, a.rel_pos_w))
        keys = k.transpose(-2, -1)
        out = []
        for top in range(0, h, self.rows):
            bottom = min(h, top + self.rows)
            n = bottom - top
            scores = (q[:, top * w : bottom * w] * a.scale) @ keys  # [B * heads, n * W, H * W]
            scores = (
                scores.view(bh, n, w, h, w)
                + rel_h[:, top:bottom, :, :, None]
                + rel_w[:, top:bottom, :, None, :]
            ).view(bh, n * w, h * w)
            out.append(scores.softmax(dim=-1) @ v)
        y = torch.cat(out, dim=1) if len(out) > 1 else out[0]
        y = y.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return a.proj(y)


@contextlib.contextmanager
def blocked_global_attention(encoder: nn.Module, rows: int | None) -> Iterator[int]:
    """While inside, the global-attention blocks of a ViT SAM ``encoder`` use :class:`BlockedGlobalAttention`.

    Yields how many blocks were changed (0 for a TinyViT, whose attention is all windowed, or when ``rows`` is
    None or covers the whole map). The original modules are put back on exit, so parity checks compare against
    them.
    """
    if rows is None or not isinstance(encoder, ImageEncoderViT):
        yield 0
        return
    side = encoder.patch_embed.proj.stride[0]
    grid = encoder.img_size // side
    if rows >= grid:
        yield 0
        return
    originals = {}
    for i, block in enumerate(encoder.blocks):
        if block.window_size == 0:  # segment-anything marks global attention with window size 0
            originals[i] = block.attn
            block.attn = BlockedGlobalAttention(block.attn, rows)
    try:
        yield len(originals)
    finally:
        for i, attention in originals.items():
            encoder.blocks[i].attn = attention
