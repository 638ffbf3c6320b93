"""``python -m bench.upscale --quick`` end to end, so its code cannot rot: every row it promises, no timings.

The quick run exports the tiny RRDBNet with the project's exporter and measures it on the 1920x1080 scene
shrunk to 240x135, untiled and in tiles of 64, each in its own process. Speed is never asserted (DESIGN.md).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import CACHE, ROOT


def test_quick_run_writes_the_table(tmp_path):
    cmd = [sys.executable, "-m", "bench.upscale", "--quick", "--scenes", "1080", "--cache",
           str(CACHE / "bench"), "--output", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    md = (tmp_path / "upscale-quick.md").read_text()
    table = json.loads((tmp_path / "upscale-quick.json").read_text())["table"]
    assert [(r["scene"], r["mode"], r["calls"]) for r in table] == [
        ("240x135 -> 960x540", "untiled", 1), ("240x135 -> 960x540", "tile 64", 4 * 3)]
    assert all(r["median_s"] > 0 and r["peak_rss"] > r["working_rss"] > 0 for r in table)
    assert table[0]["vs_untiled"] == 1.0 and table[1]["vs_untiled"] > 0
    assert "| tiny (quick) | 240x135 -> 960x540 | tile 64 | 12 |" in md
