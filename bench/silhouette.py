"""The second SAM encode (issue 15, item 3): where compose's silhouette of the generated character should come
from.

    python -m bench.silhouette                    # SAM vit_t and vit_b (full size, random weights; exported
    once) python -m bench.silhouette --types vit_t vit_h --runs 3 python -m bench.silhouette --quick
    # test-size encoders (tiny_t, tiny): a smoke check

A swap used to run SAM's encoder a second time, on the generated crop, to cut the character by its own
silhouette. The choices measured here:

- **SAM on the generated crop** (any encoder: the repository's own, or a light one for the silhouette only),
  prompted by the person's box, raw (SAM's mask, cleaned) and guarded (kept only when it overlaps the person's
  mask by ``SILHOUETTE_MIN_IOU``: :func:`isekai.ensemble.compose.character_silhouette`);
- **the person's own mask carried over** into the crop (no model call).

Trained SAM weights cannot be had here, so the check is one where the answer is known: synthetic scenes whose
person is a drawn figure on a textured background, and a "generated" crop whose character is a known shape
that differs from the person the way an img2img redraw does (longer hair, a wider skirt, the figure shifted a
few pixels), drawn in flat colours on the background without the person. Each choice's silhouette is scored
against the character's true shape (IoU) and by the composite it gives (mean absolute error in the person's
box, 0..255, against the composite through the true shape), and each SAM's encode + decode is timed on the
crop with the served session options (``bench.onnx_pipeline.OnnxPipeline``). Writes
``bench/results/silhouette.md`` and ``.json`` (``--quick``: ``silhouette-quick.*``; other ``--types``:
``silhouette-<types>.*``) as the code wrote them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.encoder_run import describe_machine, machine
from bench.models import DEFAULT_CACHE, segment_repository
from bench.onnx_pipeline import OnnxPipeline
from bench.timing import median, say, time_calls
from isekai import constants as C
from isekai.ensemble import masks as M
from isekai.ensemble.compose import character_silhouette, compose, mask_iou, prepare_person
from isekai.ensemble.crops import CropGeometry

RESULTS = Path(__file__).resolve().parent / "results"
FULL_TYPES = ("vit_t", "vit_b")
QUICK_TYPES = ("tiny_t", "tiny")
PERSON_COLOURS = ((196, 150, 120), (60, 70, 110))  # skin, clothes
CHARACTER_COLOURS = ((250, 200, 210), (240, 120, 170), (40, 60, 160))  # skin, hair, outfit


@dataclass(frozen=True)
class Case:
    """One synthetic swap: the scene, the person's mask, the generated crop and the character's true shape."""

    name: str
    scene: np.ndarray  # uint8 [H, W, 3] with the person
    person: np.ndarray  # bool [H, W]
    geometry: CropGeometry  # the person crop
    box: np.ndarray  # float32 [4]: the character box prompt in crop pixels
    character: np.ndarray  # uint8 [h, w, 3]: the "generated" crop
    truth: np.ndarray  # bool [h, w]: the character's shape in it
    empty: np.ndarray  # uint8 [H, W, 3]: the scene without the person (a perfect LaMa)


def _ellipse(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return np.hypot((xx - cx) / rx, (yy - cy) / ry) <= 1.0


def _background(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([90 + 80 * x / w, 120 + 60 * y / h, 150 - 50 * (x + y) / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _figure(
    h: int,
    w: int,
    cx: float,
    top: float,
    height: float,
    *,
    hair: float = 0.0,
    skirt: float = 1.0,
    shift: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(head, body) bool masks of a standing figure: a head and a torso-and-skirt; ``hair`` widens the head
    and lets it fall to the shoulders, ``skirt`` widens the lower body, ``shift`` moves it right (pixels)."""
    cx = cx + shift
    r = 0.11 * height
    head = _ellipse(h, w, cx, top + r, r * (1 + hair), r * (1 + 1.6 * hair))
    body = _ellipse(h, w, cx, top + 2 * r + 0.42 * height, 0.2 * height, 0.42 * height)
    lower = _ellipse(h, w, cx, top + 0.8 * height, 0.23 * height * skirt, 0.18 * height)
    return head, body | lower


def make_case(name: str, size: tuple[int, int], seed: int) -> Case:
    h, w = size
    empty = _background(h, w, seed)
    height = 0.8 * h
    cx, top = 0.5 * w, 0.12 * h
    head, body = _figure(h, w, cx, top, height)
    person = head | body
    scene = empty.copy()
    scene[body], scene[head] = PERSON_COLOURS[1], PERSON_COLOURS[0]
    logits = np.where(person, 8.0, -8.0).astype(np.float32)[None, None]
    click = np.array([[cx, top + 0.5 * height]], np.float32)
    prepared = prepare_person(scene, logits, click, np.array([1], np.int32))
    g = prepared.person_geometry
    # The redraw: longer hair, a wider skirt, a few pixels to the side (img2img at 0.75 moves outlines this
    # much).
    c_head, c_body = _figure(h, w, cx, top, height, hair=0.35, skirt=1.3, shift=0.015 * w)
    hair = c_head & ~_figure(h, w, cx, top, height, shift=0.015 * w)[0]
    # img2img redraws the whole crop, background too: a tinted, re-grained copy of it, so a silhouette that
    # takes in background pastes pixels the LaMa background does not have (the composite error shows it).
    grain = np.random.default_rng(seed + 100).normal(0, 10, empty.shape)
    drawn = np.clip(empty * 0.85 + np.array([30, 10, -10]) + grain, 0, 255).astype(np.uint8)
    drawn[c_body], drawn[c_head] = CHARACTER_COLOURS[2], CHARACTER_COLOURS[0]
    drawn[hair] = CHARACTER_COLOURS[1]
    shape = c_head | c_body
    drawn[shape & M.dilate(~shape, 2)] = (30, 20, 40)  # a dark line-art edge
    return Case(
        name, scene, prepared.mask, g, prepared.character_box, g.extract(drawn), g.extract_mask(shape), empty
    )


def cases(quick: bool) -> list[Case]:
    sizes = (
        ("portrait 640x480", (640, 480)),
        ("landscape 480x640", (480, 640)),
        ("square 512x512", (512, 512)),
    )
    return [make_case(name, size, seed) for seed, (name, size) in enumerate(sizes[: 1 if quick else 3])]


def score(case: Case, silhouette: np.ndarray) -> dict[str, float]:
    """IoU with the character's true shape (crop work area) and the composite's mean absolute error in the
    person's box against the composite through the true shape."""
    g = case.geometry
    inside = (slice(0, g.work_h), slice(0, g.work_w))
    want = compose(case.empty, case.character, case.truth, g)
    got = compose(case.empty, case.character, silhouette, g)
    x0, y0, x1, y1 = g.box
    error = np.abs(got[y0:y1, x0:x1].astype(int) - want[y0:y1, x0:x1].astype(int)).mean()
    return {"iou": mask_iou(silhouette[inside], case.truth[inside]), "composite_mae": float(error)}


def sam_logits(pipe: OnnxPipeline, case: Case) -> np.ndarray:
    h, w = case.character.shape[:2]
    masks, _, _ = pipe.decode(pipe.encode(case.character), (h, w), None, None, case.box)
    return masks


def measure(types: tuple[str, ...], root: Path, quick: bool, runs: int) -> dict:
    out: dict = {"cases": {}, "costs": {}, "machine": machine()}
    made = cases(quick)
    for case in made:
        carried = character_silhouette(None, case.person, case.geometry)
        out["cases"][case.name] = {"the person's mask carried over": score(case, carried)}
    for sam_type in types:
        repository = segment_repository(root, sam_type)  # configs (session options) and the SAM graphs
        pipe = OnnxPipeline(repository, models=(C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL))
        say(f"silhouette: SAM {sam_type} on {len(made)} synthetic crop(s)")
        for case in made:
            logits = sam_logits(pipe, case)
            raw = M.clean(M.binarize(M.as_2d(logits, "masks")))
            entry = out["cases"][case.name]
            entry[f"sam {sam_type} (raw)"] = score(case, raw)
            entry[f"sam {sam_type} (guarded)"] = score(
                case, character_silhouette(logits, case.person, case.geometry)
            )
        crop = made[0]
        h, w = crop.character.shape[:2]
        encode = median(time_calls(lambda p=pipe, c=crop: p.encode(c.character), runs))
        embeddings = pipe.encode(crop.character)
        decode = median(
            time_calls(lambda p=pipe, e=embeddings, c=crop, s=(h, w): p.decode(e, s, None, None, c.box), runs)
        )
        out["costs"][sam_type] = {"encode_s": encode, "decode_s": decode, "crop": [h, w]}
        say(
            f"silhouette: SAM {sam_type}: encode {encode:.2f} s, decode {decode * 1e3:.0f} ms, {h}x{w} crop"
        )
    carried = _time(lambda c=made[0]: character_silhouette(None, c.person, c.geometry), runs)
    out["costs"]["person_mask"] = {"encode_s": 0.0, "decode_s": 0.0, "carry_s": carried}
    return out


def _time(fn: Callable[[], object], runs: int) -> float:
    started = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - started) / runs


def markdown(result: dict, command: str) -> str:
    out = [
        "# compose's silhouette: SAM on the generated crop vs the person's own mask",
        "",
        f"Command: `{command}`  ",
        f"Machine: {describe_machine(result['machine'])}  ",
        f"Machine load (1-min load average at the start/end; above {result['machine']['cores']} the cores "
        f"were shared with other work and the costs below are inflated): {result['load'][0]:.1f}/"
        f"{result['load'][1]:.1f}  ",
        "Models: random weights (SAM cannot be trained here): the quality columns show what these weights do "
        "on a crop whose character's shape is known; trained weights would find the character far better.",
        "",
        "## Quality on the synthetic crops",
        "",
        "IoU of each silhouette with the character's true shape; in brackets, the composite's mean absolute "
        "error in the person's box (0..255) against the composite through the true shape. The person's mask "
        "scores what the redraw keeps of the person's outline: what carrying it over loses is the rest.",
        "",
    ]
    names = list(result["cases"])
    methods = list(next(iter(result["cases"].values())))
    out += ["| silhouette | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for method in methods:
        cells = [
            f"{result['cases'][n][method]['iou']:.3f} ({result['cases'][n][method]['composite_mae']:.1f})"
            for n in names
        ]
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    out += [
        "",
        "## Cost per swap",
        "",
        "| silhouette | encode | decode | crop |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, cost in result["costs"].items():
        if name == "person_mask":
            out.append(
                f"| the person's mask carried over | — | — | {cost['carry_s'] * 1e3:.1f} ms in numpy |"
            )
        else:
            out.append(
                f"| SAM {name} | {cost['encode_s']:.2f} s | {cost['decode_s'] * 1e3:.0f} ms | "
                f"{cost['crop'][0]}x{cost['crop'][1]} |"
            )
    out += [
        "",
        f"Kept as compose's default: `{C.DEFAULT_SILHOUETTE}` (compose/config.pbtxt parameter `silhouette`; "
        f"`sam` runs the repository's SAM on the crop, guarded by an IoU of {C.SILHOUETTE_MIN_IOU:g} with "
        "the person's mask).",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.silhouette", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="test-size encoders (tiny_t, tiny), one case, 1 run"
    )
    parser.add_argument(
        "--types", nargs="+", default=None, help=f"SAM types (default {' '.join(FULL_TYPES)})"
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="timed encodes per SAM type (default 3; --quick 1)"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where SAM graphs are made once")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the .md and .json go")
    args = parser.parse_args(argv)
    types = tuple(args.types or (QUICK_TYPES if args.quick else FULL_TYPES))
    runs = args.runs or (1 if args.quick else 3)
    root = args.cache / ("quick" if args.quick else "full")
    load_before = os.getloadavg()[0]
    result = measure(types, root, args.quick, runs)
    result["load"] = [load_before, os.getloadavg()[0]]
    stem = (
        "silhouette-quick"
        if args.quick
        else ("silhouette" if args.types is None else "silhouette-" + "-".join(types))
    )
    command = "python -m bench.silhouette " + " ".join(argv if argv is not None else sys.argv[1:])
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(
        json.dumps({**result, "command": command}, indent=2, default=float)
    )
    (args.results / f"{stem}.md").write_text(markdown(result, command))
    say(f"wrote {args.results / stem}.md and .json")
    print((args.results / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
