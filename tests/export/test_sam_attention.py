"""SAM's global attention exported a block of query rows at a time (export/sam_attention.py): the same
numbers as segment-anything's Attention at every block size, and the original modules back after the export.
"""

from __future__ import annotations

import pytest
import torch

from isekai import constants as C
from isekai.export.make_sam import build_sam
from isekai.export.sam_attention import BlockedGlobalAttention, blocked_global_attention
from isekai.export.sam_import import modeling

# The same float32 operations per query row, only the matmuls blocked differently: measured ~1e-6.
BLOCKED_ATOL = 1e-5
GRID = C.SAM_EMBEDDING_SIZE


@pytest.fixture(scope="module")
def attention() -> torch.nn.Module:
    """segment-anything's Attention over the 64x64 map (as in a global block), two heads of 32, random weights
    and relative positions of order one (trained ones are; zeros would hide a wrong slice)."""
    torch.manual_seed(0)
    module = modeling.image_encoder.Attention(64, num_heads=2, use_rel_pos=True, input_size=(GRID, GRID))
    with torch.no_grad():
        module.rel_pos_h.normal_()
        module.rel_pos_w.normal_()
    return module.eval()


@pytest.mark.parametrize("rows", [1, 5, 8, 63, GRID])  # 5 and 63 leave a smaller last block
def test_blocked_attention_matches_segment_anything(attention, rows):
    x = torch.randn(1, GRID, GRID, 64, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        want = attention(x)
        got = BlockedGlobalAttention(attention, rows)(x)
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    print(f"rows {rows}: max |blocked - segment-anything| {diff:.2e}")
    assert diff <= BLOCKED_ATOL


def test_context_swaps_global_blocks_only_and_restores_them():
    encoder = build_sam("tiny").image_encoder  # block 0 windowed, block 1 global
    originals = [block.attn for block in encoder.blocks]
    with blocked_global_attention(encoder, 8) as changed:
        assert changed == 1
        assert encoder.blocks[0].attn is originals[0]
        assert isinstance(encoder.blocks[1].attn, BlockedGlobalAttention)
        assert encoder.blocks[1].attn.attention is originals[1]
    assert [block.attn for block in encoder.blocks] == originals
    for rows in (None, GRID):  # nothing to do: the whole map at once is segment-anything's own code
        with blocked_global_attention(encoder, rows) as changed:
            assert changed == 0 and [block.attn for block in encoder.blocks] == originals


def test_tinyvit_has_no_global_attention():
    encoder = build_sam("tiny_t").image_encoder
    with blocked_global_attention(encoder, 8) as changed:
        assert changed == 0


def test_bad_rows_are_refused(attention):
    with pytest.raises(ValueError, match="query rows per block should be >= 1 but is 0"):
        BlockedGlobalAttention(attention, 0)
