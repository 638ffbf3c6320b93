"""The UNet's self-attention for export, computed one head at a time: same numbers, smaller buffers.

diffusers' attention processors run every head at once. Exported, that is a MatMul -> Softmax -> MatMul chain
over [B, heads, N, N] scores, N the latent's pixels: for a 448x512 person crop (latent 56x64, N = 3584) at
guidance batch 2, SD 1.5's 8 heads make 822 MB per score tensor, and onnxruntime holds the scores and their
softmax at once in the UNet's first and last blocks: ~2 GB above the weights in the served ``unet`` stub.

:class:`HeadSlicedSelfAttention` computes the same attention a head at a time ([B, N, N] scores, 103 MB in
that example) and concatenates the heads. Each head is the same arithmetic as before (this is not a running
softmax), the loop runs in Python at export time, so the graph has no loop operator: ``heads`` copies of
(matmul, softmax, matmul) in order, each freed before the next one's is allocated. The head count is fixed by
the weights, so the slicing holds for every batch and latent size the graph accepts (both dynamic).

Only plain self-attention is changed (the UNet's ``attn1``): cross-attention's scores are N x 77, and
attention with a group norm, residual or spatial norm (the VAE's mid block: one head over the latent) keeps
its processor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.models.attention_processor import Attention
from torch import nn


def _plain_self_attention(attn: Attention) -> bool:
    """True for attention that is only q/k/v projections, softmax and the out projection (what the processor
    below implements); anything else keeps diffusers' processor."""
    return (
        not attn.is_cross_attention
        and attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.residual_connection
        and attn.rescale_output_factor == 1.0
    )


class HeadSlicedSelfAttention:
    """A diffusers attention processor: self-attention of [B, N, C] tokens, one head's scores at a time."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError(
                "HeadSlicedSelfAttention runs unmasked self-attention on [B, N, C] tokens only: got "
                f"{hidden_states.ndim}-d states, encoder states {encoder_hidden_states is not None}, "
                f"mask {attention_mask is not None}"
            )
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        width = query.shape[-1] // attn.heads
        heads = []
        for h in range(attn.heads):
            part = slice(h * width, (h + 1) * width)
            scores = (query[..., part] * attn.scale) @ key[..., part].transpose(-2, -1)  # [B, N, N]
            heads.append(scores.softmax(dim=-1) @ value[..., part])
        out = torch.cat(heads, dim=-1) if len(heads) > 1 else heads[0]
        return attn.to_out[1](attn.to_out[0](out))  # projection, dropout


@contextlib.contextmanager
def head_sliced_self_attention(module: nn.Module) -> Iterator[int]:
    """While inside, every plain self-attention of ``module`` (diffusers ``Attention``) runs
    :class:`HeadSlicedSelfAttention`. Yields how many were changed (0 for a model without any, e.g. the text
    encoder or the VAE). The original processors are put back on exit, so parity checks compare against
    diffusers' own attention."""
    originals = {
        m: m.processor for m in module.modules()
        if isinstance(m, Attention) and m.heads > 1 and _plain_self_attention(m)
    }
    sliced = HeadSlicedSelfAttention()
    for attention in originals:
        attention.set_processor(sliced)
    try:
        yield len(originals)
    finally:
        for attention, processor in originals.items():
            attention.set_processor(processor)
