"""The UNet's self-attention exported one head at a time (export/sd_attention.py): the same numbers as
diffusers' own processors, only self-attention changed, and the originals back after the export (the sliced
attention in the exported graph and its parity with PyTorch: test_sd_export.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from isekai.export import sd
from isekai.export.make_sd import make_sd_folder
from isekai.export.sd_attention import HeadSlicedSelfAttention, head_sliced_self_attention

# The same float32 operations per head, only the matmuls split by head: measured ~1e-7.
SLICED_ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return sd.load_sd(make_sd_folder(tmp_path_factory.mktemp("sd") / "tiny", "tiny", seed=0))


@pytest.mark.parametrize("heads", [1, 4, 8])
def test_sliced_heads_match_diffusers(heads):
    torch.manual_seed(heads)
    attention = Attention(query_dim=64, heads=heads, dim_head=64 // heads).eval()
    x = torch.randn(2, 96, 64)
    with torch.no_grad():
        attention.set_processor(AttnProcessor2_0())
        want = attention(x)
        attention.set_processor(HeadSlicedSelfAttention())
        got = attention(x)
    diff = (got - want).abs().max().item()
    print(f"heads {heads}: max |sliced - diffusers| {diff:.2e}")
    assert got.shape == want.shape
    assert diff <= SLICED_ATOL


def test_cross_attention_and_masks_are_refused():
    attention = Attention(query_dim=16, heads=2, dim_head=8, cross_attention_dim=8)
    with pytest.raises(ValueError, match="self-attention"):
        HeadSlicedSelfAttention()(attention, torch.zeros(1, 4, 16), encoder_hidden_states=torch.ones(1, 3, 8))


def test_context_slices_the_unets_self_attention_only_and_restores_it(models):
    unet = models.unet
    blocks = [m for n, m in unet.named_modules() if n.endswith("attn1")]
    cross = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    before = {m: m.processor for m in unet.modules() if isinstance(m, Attention)}
    with head_sliced_self_attention(unet) as changed:
        assert changed == len(blocks) > 0
        assert all(isinstance(m.processor, HeadSlicedSelfAttention) for m in blocks)
        assert not any(isinstance(m.processor, HeadSlicedSelfAttention) for m in cross)
    assert {m: m.processor for m in unet.modules() if isinstance(m, Attention)} == before
    # The VAE's mid-block attention (one head, group norm, residual) keeps its processor.
    with head_sliced_self_attention(models.vae) as changed:
        assert changed == 0
