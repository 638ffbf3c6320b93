"""The README's API defaults and limits quote isekai/constants.py: a changed constant must change the docs."""

from __future__ import annotations

import re

import pytest

from isekai import constants as C
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def table_row(first_cell: str) -> str:
    rows = [line for line in README.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"README has {len(rows)} table rows starting with {first_cell!r}"
    return rows[0]


@pytest.mark.parametrize(("name", "default"), [
    ("strength", C.DEFAULT_STRENGTH), ("seed", C.DEFAULT_SEED), ("format", C.DEFAULT_FORMAT),
    ("upscale", C.DEFAULT_UPSCALE),
])
def test_api_table_quotes_the_defaults(name, default):
    cells = [c.strip() for c in table_row(f"`{name}`").split("|")]
    assert cells[4] == str(default), f"README default of {name}: {cells[4]!r}, constants: {default!r}"


@pytest.mark.parametrize(("name", "index"), [("steps", 0), ("guidance", 1)])
def test_steps_and_guidance_defaults_follow_the_exported_scheduler(name, index):
    """Their defaults are the exported scheduler's: the cell says so and quotes each scheduler's."""
    cell = [c.strip() for c in table_row(f"`{name}`").split("|")][4]
    assert cell.startswith("the exported scheduler's:"), cell
    dpm, lcm = C.SCHEDULER_DEFAULTS[C.DPM_SCHEDULER][index], C.SCHEDULER_DEFAULTS[C.LCM_SCHEDULER][index]
    assert f"{dpm:g} (DPM-Solver++)" in cell and f"{lcm:g} (LCM" in cell, cell
    assert set(C.SCHEDULER_DEFAULTS) == {C.DPM_SCHEDULER, C.LCM_SCHEDULER}, "quote a new scheduler's defaults"


def test_limits_table_quotes_the_limits():
    mib = C.MAX_IMAGE_BYTES // 2**20
    side = int(C.MAX_IMAGE_PIXELS**0.5)
    assert f"{mib} MiB" in table_row("encoded image")
    assert f"{side} x {side}" in table_row("pixels (checked from the header, before decoding)")
    assert f"at least {C.MIN_IMAGE_SIDE}" in table_row("pixels (checked from the header, before decoding)")
    assert f"at most {C.MAX_POINTS}" in table_row("clicks")
    assert f"1 .. {C.MAX_STEPS}" in table_row("steps")
    assert f"{C.MIN_GUIDANCE:g} .. {C.MAX_GUIDANCE:g}" in table_row("guidance")
    assert f"at most {C.MAX_PROMPT_CHARS} characters" in table_row("prompt")
    assert C.CHARACTER_NAME_PATTERN in table_row("character")
    assert all(f in table_row("format") for f in C.OUTPUT_FORMATS)


def test_cache_bounds_quoted_where_the_cache_is_described():
    assert f"{C.EMBEDDING_CACHE_ENTRIES} entries, {C.EMBEDDING_CACHE_BYTES // 2**20} MiB" in README
    config = (ROOT / "model_repository" / C.EMBEDDING_CACHE_MODEL / "config.pbtxt").read_text()
    assert re.search(rf'"cache_entries" value: {{ string_value: "{C.EMBEDDING_CACHE_ENTRIES}" }}', config)
    assert re.search(rf'"cache_bytes" value: {{ string_value: "{C.EMBEDDING_CACHE_BYTES}" }}', config)


def test_stub_watchdog_timings_quoted():
    assert f"every {C.SUPERVISOR_INTERVAL_S:g} s" in README
    assert f"once it has lasted {C.STUB_DEATH_CONFIRM_S:g} s (`STUB_DEATH_CONFIRM_S`)" in README


def test_character_weight_budgets_quoted_where_characters_are_described():
    assert f"`character_adapter_bytes` ({C.CHARACTER_ADAPTER_BYTES // 2**30} GiB)" in README
    assert f"`character_graph_bytes` ({C.CHARACTER_GRAPH_BYTES // 2**30} GiB)" in README
    for model in (C.UNET_MODEL, C.TEXT_ENCODER_MODEL):
        for config in (ROOT / "model_repository" / model).rglob("*.pbtxt"):
            text = config.read_text()
            assert (
                f'"character_adapter_bytes" value: {{ string_value: "{C.CHARACTER_ADAPTER_BYTES}" }}' in text
            )
            assert f'"character_graph_bytes" value: {{ string_value: "{C.CHARACTER_GRAPH_BYTES}" }}' in text


def test_super_resolution_quotes_the_factors_tiles_and_limits():
    side = int(C.MAX_UPSCALED_PIXELS**0.5)
    row = table_row("upscale")
    assert ", ".join(map(str, C.UPSCALE_FACTORS[:-1])) + f" or {C.UPSCALE_FACTORS[-1]}" in row
    assert f"at most {side} x {side} pixels" in row
    assert f"{C.ENCODER_MAX_SIDE['webp']} pixels a side in webp, {C.ENCODER_MAX_SIDE['jpeg']} in jpeg" in row
    section = README.split("### Super-resolution", 1)[1].split("\n## ", 1)[0]
    assert f"tiles of {C.UPSCALE_TILE} pixels with {C.UPSCALE_TILE_PAD} of context" in section
    assert f"at most {side} x {side} pixels (`MAX_UPSCALED_PIXELS`" in section
    assert "isekai export esrgan --checkpoint" in section


def test_load_shedding_timeouts_and_retries_quoted():
    section = " ".join(README.split("### Busy, stuck or failing", 1)[1].split("\n### ", 1)[0].split())
    sizes = C.STEP_QUEUE_SIZES
    click_steps = (C.PREPROCESS_MODEL, C.SAM_DECODER_MODEL, C.SEGMENT_MASK_MODEL)
    assert len({sizes[m] for m in click_steps}) == 1 and sizes[C.COMPOSE_MODEL] == sizes[C.FINISH_MODEL]
    assert (f"{sizes[C.PREPROCESS_MODEL]} for the click steps `preprocess`, `sam_decoder` and "
            f"`segment_mask`, `prepare` {sizes[C.PREPARE_MODEL]}, `compose` and `finish` "
            f"{sizes[C.COMPOSE_MODEL]}") in section
    assert all(f"`{m}`" in section for m in C.UNBOUNDED_STEPS)
    assert f"at most {C.QUEUE_TIMEOUT_S} s, `QUEUE_TIMEOUT_S`" in section
    assert f"else {C.BLS_TIMEOUT_S:g} s per call (`BLS_TIMEOUT_S`)" in section
    assert f"up to {C.RETRY_ATTEMPTS} tries (`RETRY_ATTEMPTS`)" in section
    assert (
        f"waiting {C.RETRY_BASE_DELAY_S:g}, 2, 4 s with jitter (at most {C.RETRY_MAX_DELAY_S:g} s)" in section
    )
    for message in C.BUSY_MESSAGES:
        assert f"`{message}`" in section
