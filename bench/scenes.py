"""The benchmark's photos: skimage's astronaut at 512x512, and the same person placed into a 1920x1080 scene.

Every request of a timed run sends different bytes (a PNG text chunk numbers it) with the same pixels, so the
server's embedding cache (keyed by the bytes' SHA-256) misses exactly when a run means to measure a cold
request.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, replace

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

# The astronaut's chest in skimage.data.astronaut() (x, y), the click the demo and the tests use.
ASTRONAUT_CLICK = (200.0, 300.0)
# Further clicks of the click-look-click rows (x, y in the astronaut's pixels): her face, her other shoulder,
# and a negative click on the flag behind her.
ASTRONAUT_MORE_CLICKS = ((180.0, 150.0, 1), (320.0, 330.0, 1), (460.0, 60.0, 0))
# The large scene: 1920x1080, the astronaut scaled by LARGE_SCALE with her top-left corner at LARGE_OFFSET.
LARGE_SIZE = (1080, 1920)  # (H, W)
LARGE_SCALE = 1.5
LARGE_OFFSET = (576, 312)  # (x, y)


@dataclass(frozen=True, eq=False)
class Scene:
    """A photo with a person and where a user clicks on them.

    ``rgb`` is uint8 [H, W, 3]; ``click`` and ``more_clicks`` are (x, y) in its pixels (``more_clicks`` carry
    a label: 1 = the person, 0 = not).
    """

    name: str
    rgb: np.ndarray
    click: tuple[float, float]
    more_clicks: tuple[tuple[float, float, int], ...]

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]

    def png(self, tag: str = "") -> bytes:
        """The photo as PNG; a different ``tag`` gives different bytes (another cache key) for the same
        pixels."""
        info = PngImagePlugin.PngInfo()
        if tag:
            info.add_text("isekai-bench", tag)
        buf = io.BytesIO()
        Image.fromarray(self.rgb).save(buf, format="PNG", pnginfo=info, compress_level=1)
        return buf.getvalue()


def astronaut() -> Scene:
    from skimage import data  # noqa: PLC0415

    return Scene("512x512", data.astronaut(), ASTRONAUT_CLICK, ASTRONAUT_MORE_CLICKS)


def large_scene() -> Scene:
    """1920x1080: skimage's rocket photo stretched as the background, the astronaut pasted in at 1.5x."""
    from skimage import data  # noqa: PLC0415

    h, w = LARGE_SIZE
    background = cv2.resize(data.rocket(), (w, h), interpolation=cv2.INTER_LINEAR)
    person = data.astronaut()
    side = round(person.shape[0] * LARGE_SCALE)
    person = cv2.resize(person, (side, side), interpolation=cv2.INTER_LINEAR)
    x0, y0 = LARGE_OFFSET
    part = person[: h - y0, : w - x0]
    background[y0 : y0 + part.shape[0], x0 : x0 + part.shape[1]] = part

    def place(x: float, y: float) -> tuple[float, float]:
        return x0 + x * LARGE_SCALE, y0 + y * LARGE_SCALE

    more = tuple((*place(x, y), label) for x, y, label in ASTRONAUT_MORE_CLICKS)
    return Scene("1920x1080", background, place(*ASTRONAUT_CLICK), more)


SCENES = {"512": astronaut, "1080": large_scene}


def scenes(names: list[str]) -> list[Scene]:
    """Scenes by short name (``512``, ``1080``)."""
    unknown = [n for n in names if n not in SCENES]
    if unknown:
        raise ValueError(f"unknown scene(s) {unknown}; choose from {sorted(SCENES)}")
    return [SCENES[n]() for n in names]


def candidate_clicks(scene: Scene, grid: int = 6) -> list[tuple[float, float]]:
    """Clicks on the person to try, in order: the scene's click, its other positive clicks, then a grid over
    the person's region (the astronaut's box, scaled into the scene)."""
    x0, y0 = (0.0, 0.0) if scene.name == "512x512" else LARGE_OFFSET
    scale = 1.0 if scene.name == "512x512" else LARGE_SCALE
    # The astronaut in skimage's photo: about x 40..440, y 40..512.
    xs = [x0 + scale * (40 + 400 * (i + 0.5) / grid) for i in range(grid)]
    ys = [y0 + scale * (40 + 470 * (j + 0.5) / grid) for j in range(grid)]
    h, w = scene.size
    grid_clicks = [(x, y) for y in ys for x in xs if x < w and y < h]
    return [scene.click, *((x, y) for x, y, label in scene.more_clicks if label), *grid_clicks]


def pick_click(scene: Scene,
               finds_person: Callable[[tuple[float, float]], bool]) -> tuple[tuple[float, float], int]:
    """The first of :func:`candidate_clicks` for which ``finds_person(click)`` is true, and how many were
    tried.

    With random weights SAM's mask is noise: for most clicks the cleaned mask is too small to count as a
    person, and the swap then skips LaMa and the diffusion (a click on nothing). The benchmark measures the
    cost of a swap that finds someone, so it clicks where this SAM does. Falls back to the scene's own click.
    """
    candidates = candidate_clicks(scene)
    for k, click in enumerate(candidates, 1):
        if finds_person(click):
            return click, k
    return scene.click, len(candidates)


def with_click(scene: Scene, click: tuple[float, float] | None) -> Scene:
    return scene if click is None else replace(scene, click=(float(click[0]), float(click[1])))
