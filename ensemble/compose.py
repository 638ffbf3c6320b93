"""The ``prepare`` and ``compose`` stages as plain functions: masks and crops in, the finished scene out.

``prepare_person`` turns SAM's logits into everything the generative stages need (:class:`Prepared`);
``compose_scene`` puts LaMa's background and the diffusion's character back together. The ``model.py``
adapters only move tensors: every array a stage passes on is a field here, and geometry travels as
``CropGeometry.to_array()`` (int64 ``[8]``).

When SAM finds no person (a click on nothing), the stages still run, because a Triton ensemble cannot skip a
step: :func:`prepare_person` then returns ``found=False``, empty masks, and small placeholder inputs
(``PLACEHOLDER_SIDE``) so LaMa and the diffusion cost little, and :func:`compose_scene` returns the photo
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isekai import constants as C
from isekai.ensemble import masks as M
from isekai.ensemble.crops import CropGeometry, lama_crop, lama_inputs, paste, person_crop, whole_image_crop
from isekai.ensemble.images import encode_mask


@dataclass(frozen=True, eq=False)
class Prepared:
    """Output of the ``prepare`` stage (H, W: the scene; h, w: each crop's padded size).

    Attributes:
        found: whether a person was found (see :func:`isekai.ensemble.masks.person_found`).
        mask: bool ``[H, W]`` the cleaned person mask (all False when not found): the public ``mask`` output.
        hole: bool ``[H, W]`` the mask dilated: what LaMa fills and the background paste replaces.
        box: float32 ``[4]`` the person's tight box ``(x0, y0, x1, y1)`` in scene pixels (zeros when not
            found).
        lama_image: float32 ``[1, 3, h, w]`` in 0..1, LaMa's ``image`` input.
        lama_mask: float32 ``[1, 1, h, w]`` 1 = hole, LaMa's ``mask`` input.
        lama_geometry: where the LaMa crop sits in the scene.
        person_image: uint8 ``[h, w, 3]`` RGB, the img2img input (long side ``SD_NATIVE_SIZE``).
        person_geometry: where the person crop sits in the scene.
        character_box: float32 ``[4]`` the person's box in person-crop pixels: the SAM box prompt that cuts
            the generated character out of its crop.
    """

    found: bool
    mask: np.ndarray
    hole: np.ndarray
    box: np.ndarray
    lama_image: np.ndarray
    lama_mask: np.ndarray
    lama_geometry: CropGeometry
    person_image: np.ndarray
    person_geometry: CropGeometry
    character_box: np.ndarray


def prepare_person(
    image: np.ndarray,
    mask_logits: np.ndarray,
    points: np.ndarray | None,
    labels: np.ndarray | None,
    *,
    dilation: int | None = None,
    lama_working_size: int = C.LAMA_WORKING_SIZE,
    sd_long_side: int = C.SD_NATIVE_SIZE,
    sd_multiple: int = C.SD_SIZE_MULTIPLE,
) -> Prepared:
    """From SAM's answer to the generative stages' inputs.

    Args:
        image: uint8 ``[H, W, 3]`` RGB scene.
        mask_logits: float ``[1, 1, H, W]`` (or ``[H, W]``) SAM decoder ``masks`` output at the scene's size.
        points: ``[N, 2]`` ``(x, y)`` clicks in scene pixels (or None), used to keep the clicked parts.
        labels: ``[N]`` 1/0 (or None).
        dilation: hole dilation in pixels; default :func:`isekai.ensemble.masks.dilation_px`.
        lama_working_size, sd_long_side, sd_multiple: crop sizes (constants by default).
    """
    h, w = image.shape[:2]
    logits = M.as_2d(mask_logits, "mask_logits")
    if logits.shape != (h, w):
        raise ValueError(f"mask_logits must be [1, 1, {h}, {w}] like the image but has shape "
                         f"{np.shape(mask_logits)}")
    mask = M.clean(M.binarize(logits), points, labels)
    if not M.person_found(mask):
        return _not_found(image, lama_working_size, sd_multiple)
    hole = M.dilate(mask, M.dilation_px(image.shape) if dilation is None else dilation)
    lama_image, lama_mask, lama_geometry = lama_crop(image, hole, working_size=lama_working_size)
    person_image, person_geometry = person_crop(image, mask, long_side=sd_long_side, multiple=sd_multiple)
    box = np.asarray(M.bounding_box(mask), dtype=np.float32)
    return Prepared(True, mask, hole, box, lama_image, lama_mask, lama_geometry, person_image,
                    person_geometry, character_box_prompt(box, person_geometry))


def public_mask(mask_logits: np.ndarray) -> bytes:
    """The ``mask`` output of both public models: SAM's own mask (logits above the threshold) as a PNG.

    Deliberately not the cleaned :attr:`Prepared.mask`: ``isekai_segment`` answers exactly what SamPredictor
    would for the same clicks, and ``isekai`` must show the same mask for them; the cleanup only shapes the
    hole and crops.
    """
    return encode_mask(M.binarize(M.as_2d(mask_logits, "masks")))


def character_box_prompt(person_box: np.ndarray, geometry: CropGeometry) -> np.ndarray:
    """The person's scene box ``(x0, y0, x1, y1)`` mapped into the person crop: float32 ``[4]`` in crop
    pixels, clipped to the crop's content. Prompting SAM with it on the generated crop selects the
    character."""
    corners = geometry.to_crop(np.asarray(person_box, np.float64).reshape(2, 2))
    corners[:, 0] = np.clip(corners[:, 0], 0, geometry.work_w)
    corners[:, 1] = np.clip(corners[:, 1], 0, geometry.work_h)
    return corners.reshape(4).astype(np.float32)


def inpainted_to_rgb(inpainted: np.ndarray) -> np.ndarray:
    """LaMa's output float ``[1, 3, h, w]`` in 0..1 -> uint8 ``[h, w, 3]`` (values outside 0..1 are
    clipped)."""
    arr = np.asarray(inpainted, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[:2] != (1, 3):
        raise ValueError(f"inpainted must be [1, 3, h, w] but has shape {arr.shape}")
    return (
        np.rint(np.clip(np.nan_to_num(arr[0]), 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0).copy()
    )


def paste_background(image: np.ndarray, hole: np.ndarray, inpainted: np.ndarray, geometry: CropGeometry
                     ) -> np.ndarray:
    """The scene without the person: LaMa's pixels inside ``hole``, the original pixels everywhere else.

    Args:
        image: uint8 ``[H, W, 3]`` scene.
        hole: bool ``[H, W]`` the dilated mask LaMa was given (the crop covers all of it).
        inpainted: LaMa's output float32 ``[1, 3, h, w]`` in 0..1 for ``geometry``.
    Returns:
        uint8 ``[H, W, 3]``.
    """
    hole_2d = M.as_2d(hole, "hole").astype(bool)
    filled = paste(image, inpainted_to_rgb(inpainted), geometry)
    # Only the hole changes: outside it LaMa's copy of the photo went through two resizes and is blurrier.
    return np.where(hole_2d[..., None], filled, image)


def compose(
    background: np.ndarray,
    character: np.ndarray,
    silhouette: np.ndarray,
    geometry: CropGeometry,
    feather: float = C.COMPOSE_FEATHER_PX,
) -> np.ndarray:
    """Paste the character onto the background through its feathered silhouette.

    Args:
        background: uint8 ``[H, W, 3]`` scene without the person.
        character: uint8 ``[h, w, 3]`` the generated crop (same frame as the person crop, ``geometry``).
        silhouette: bool ``[h, w]`` the character's mask in that crop (padding included).
        feather: edge ramp half-width in crop pixels (:func:`isekai.ensemble.masks.feather`).
    Returns:
        uint8 ``[H, W, 3]``.
    """
    return paste(background, character, geometry, alpha=M.feather(silhouette, feather))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of one shape (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def character_silhouette(
    silhouette_logits: np.ndarray | None,
    person_mask: np.ndarray,
    geometry: CropGeometry,
    min_iou: float = C.SILHOUETTE_MIN_IOU,
) -> np.ndarray:
    """The character's mask in its crop.

    Without ``silhouette_logits`` (the default ``silhouette`` source, ``person_mask``): the person's own mask
    moved into the crop. img2img redraws the person where they stood, so the character keeps their outline up
    to what the redraw moves, and no second SAM encode is paid (``bench/silhouette.py`` measures both). With
    SAM's logits on the generated crop (source ``sam``): those thresholded and cleaned, kept only when they
    overlap the person's mask by at least ``min_iou`` (the redraw of a person at img2img strength keeps most
    of its shape, so a silhouette that does not is SAM missing the character); otherwise the person's mask.

    Args:
        silhouette_logits: float ``[1, 1, h, w]`` (or ``[h, w]``) SAM on the generated crop, prompted by
            :attr:`Prepared.character_box`; or None.
        person_mask: bool ``[H, W]`` the person in the scene.
        min_iou: the overlap with the person's mask below which SAM's silhouette is not trusted.
    Returns:
        bool ``[h, w]``.
    """
    carried = geometry.extract_mask(person_mask)
    # Mirrored into the padding as the crop's pixels are, so the feather does not fade the character where it
    # meets the edge of the photo (paste() drops the padding).
    work = carried[: geometry.work_h, : geometry.work_w]
    pad = ((0, geometry.out_h - geometry.work_h), (0, geometry.out_w - geometry.work_w))
    carried = np.pad(work, pad, mode="symmetric")
    if silhouette_logits is None:
        return carried
    logits = M.as_2d(silhouette_logits, "silhouette_logits")
    if logits.shape != (geometry.out_h, geometry.out_w):
        raise ValueError(f"silhouette_logits must be [1, 1, {geometry.out_h}, {geometry.out_w}] like the "
                         f"character crop but has shape {np.shape(silhouette_logits)}")
    # The mirrored padding keeps its share of the silhouette, so the feather does not fade the character out
    # where it meets the edge of the photo; paste() drops the padding.
    silhouette = M.clean(M.binarize(logits))
    inside = (slice(0, geometry.work_h), slice(0, geometry.work_w))
    if M.person_found(silhouette[inside]) and mask_iou(silhouette[inside], carried[inside]) >= min_iou:
        return silhouette
    return carried


def compose_scene(
    image: np.ndarray,
    mask: np.ndarray,
    hole: np.ndarray,
    inpainted: np.ndarray,
    lama_geometry: CropGeometry,
    character: np.ndarray,
    silhouette_logits: np.ndarray | None,
    person_geometry: CropGeometry,
    *,
    feather: float = C.COMPOSE_FEATHER_PX,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``compose`` stage: ``(result, background)``, both uint8 ``[H, W, 3]``.

    Args:
        image: uint8 ``[H, W, 3]`` the original scene.
        mask: bool ``[H, W]`` :attr:`Prepared.mask` (all False: no person, the photo comes back unchanged).
        hole: bool ``[H, W]`` :attr:`Prepared.hole`.
        inpainted: LaMa's output float32 ``[1, 3, h, w]`` in 0..1 (``lama_geometry``'s frame).
        character: uint8 ``[h, w, 3]`` the diffusion's output (``person_geometry``'s frame).
        silhouette_logits: float ``[1, 1, h, w]`` SAM on ``character`` prompted by the character box, or None
            for the person's own mask (:func:`character_silhouette`).
    """
    mask_2d = M.as_2d(mask, "mask").astype(bool)
    if not mask_2d.any():
        return image.copy(), image.copy()
    background = paste_background(image, hole, inpainted, lama_geometry)
    silhouette = character_silhouette(silhouette_logits, mask_2d, person_geometry)
    return compose(background, character, silhouette, person_geometry, feather), background


def _not_found(image: np.ndarray, lama_working_size: int, sd_multiple: int) -> Prepared:
    h, w = image.shape[:2]
    empty = np.zeros((h, w), dtype=bool)
    side = min(C.PLACEHOLDER_SIDE, lama_working_size)
    lama_geometry = CropGeometry.plan((0, 0, w, h), long_side=side, multiple=C.LAMA_MODULO, upscale=True,
                                      min_side=C.LAMA_MIN_SIDE)
    lama_image, lama_mask = lama_inputs(image, empty, lama_geometry)
    person_image, person_geometry = whole_image_crop(image, C.PLACEHOLDER_SIDE, sd_multiple)
    character_box = np.array([0, 0, person_geometry.work_w, person_geometry.work_h], dtype=np.float32)
    return Prepared(False, empty, empty.copy(), np.zeros(4, np.float32), lama_image, lama_mask, lama_geometry,
                    person_image, person_geometry, character_box)
