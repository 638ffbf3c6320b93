"""All of SAM's resize, coordinate and shape maths, in one class (segment-anything's ``ResizeLongestSide``,
numpy).

Geometry contracts (the ones SAM's own code leaves implicit):

- Images are uint8 ``[H, W, 3]`` RGB; ``original_size`` is always ``(H, W)``, height first.
- Points are ``(x, y)`` in pixels of the original image (x to the right, y down), continuous: pixel ``(i, j)``
  covers ``[j, j + 1) x [i, i + 1)``. Boxes are ``(x0, y0, x1, y1)`` in the same frame.
- The "1024 frame" is the original image scaled by ``long_side / max(H, W)`` per axis, with the size rounded
  as :meth:`SamTransform.get_preprocess_shape` does; the encoder input holds it at the top-left of a
  zero-padded ``long_side`` square (Sam.preprocess pads bottom/right after normalizing).
- The ONNX decoder's ``orig_im_size`` is float32 ``(H, W)`` of the ORIGINAL image; its output masks are logits
  at that size, so they need no further resizing here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from isekai import constants as C

# segment-anything's ONNX example: box corners carry labels 2 (top-left) and 3 (bottom-right); without a box a
# padding point (0, 0) with label -1 is appended (the prompt encoder was trained with that padding).
BOX_TOP_LEFT_LABEL = 2.0
BOX_BOTTOM_RIGHT_LABEL = 3.0
PAD_POINT_LABEL = -1.0


class SamTransform:
    """Resize to the SAM frame and map coordinates into it. Stateless apart from ``long_side``."""

    def __init__(self, long_side: int = C.SAM_IMAGE_SIZE) -> None:
        self.long_side = int(long_side)

    @staticmethod
    def get_preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
        """Return ``(new_h, new_w)``: ``(h, w)`` scaled so the long side is ``long_side``, rounded half up."""
        if h <= 0 or w <= 0:
            raise ValueError(f"image size must be positive but is (H, W) = ({h}, {w})")
        scale = long_side * 1.0 / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` of the image content inside the padded encoder input (the rest is padding)."""
        return self.get_preprocess_shape(original_size[0], original_size[1], self.long_side)

    def apply_image(self, rgb: np.ndarray) -> np.ndarray:
        """Resize uint8 ``[H, W, 3]`` RGB to ``[h, w, 3]`` with the long side ``long_side``.

        Pillow BILINEAR, exactly what SamPredictor does (torchvision's ``resize`` on a PIL image calls PIL).
        """
        arr = np.asarray(rgb)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"rgb must be uint8 [H, W, 3] but is {arr.dtype} {arr.shape}")
        new_h, new_w = self.input_size(arr.shape[:2])
        return np.array(Image.fromarray(arr, "RGB").resize((new_w, new_h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Map ``[..., 2]`` ``(x, y)`` original pixels into the 1024 frame (float64, same shape)."""
        sx, sy = self._scales(original_size)
        out = np.array(coords, dtype=np.float64, copy=True)
        out[..., 0] *= sx
        out[..., 1] *= sy
        return out

    def restore_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Inverse of :meth:`apply_coords`: ``[..., 2]`` 1024-frame ``(x, y)`` -> original pixels
        (float64)."""
        sx, sy = self._scales(original_size)
        out = np.array(coords, dtype=np.float64, copy=True)
        out[..., 0] /= sx
        out[..., 1] /= sy
        return out

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Map ``[..., 4]`` ``(x0, y0, x1, y1)`` original-pixel boxes into the 1024 frame (float64)."""
        arr = np.asarray(boxes, dtype=np.float64)
        return self.apply_coords(arr.reshape(*arr.shape[:-1], 2, 2), original_size).reshape(arr.shape)

    def encoder_input(self, rgb: np.ndarray) -> np.ndarray:
        """The encoder's input: float32 ``[1, 3, L, L]`` (``L = long_side``), what Sam.preprocess produces.

        ``rgb`` uint8 ``[H, W, 3]`` is resized (:meth:`apply_image`), normalized with ``SAM_PIXEL_MEAN/STD``
        (0..255 units), and zero-padded at the bottom and right.
        """
        resized = self.apply_image(rgb)
        h, w = resized.shape[:2]
        mean = np.asarray(C.SAM_PIXEL_MEAN, dtype=np.float32)
        std = np.asarray(C.SAM_PIXEL_STD, dtype=np.float32)
        out = np.zeros((1, 3, self.long_side, self.long_side), dtype=np.float32)
        out[0, :, :h, :w] = ((resized.astype(np.float32) - mean) / std).transpose(2, 0, 1)
        return out

    def decoder_prompt(
        self,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        box: np.ndarray | None,
        original_size: tuple[int, int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Build the ONNX decoder's ``point_coords`` and ``point_labels`` (segment-anything's ONNX
        convention).

        Args:
            points: ``[N, 2]`` ``(x, y)`` clicks in original pixels (N may be 0, or None for no clicks).
            labels: ``[N]`` 1 (the person) or 0 (not the person).
            box: ``[4]`` ``(x0, y0, x1, y1)`` in original pixels, or None.
            original_size: ``(H, W)`` of the original image.

        Returns:
            ``point_coords`` float32 ``[1, M, 2]`` in the 1024 frame and ``point_labels`` float32 ``[1, M]``:
            the clicks, then the box as two corners labelled 2 and 3 (``M = N + 2``), or without a box a
            padding point ``(0, 0)`` labelled -1 (``M = N + 1``).
        """
        pts = (
            np.zeros((0, 2), np.float64) if points is None else np.asarray(points, np.float64).reshape(-1, 2)
        )
        lbl = np.zeros((0,), np.float64) if labels is None else np.asarray(labels, np.float64).reshape(-1)
        if len(pts) != len(lbl):
            raise ValueError(
                f"points and labels must have the same length but have {len(pts)} and {len(lbl)}"
            )
        if box is not None:
            extra_pts = np.asarray(box, np.float64).reshape(2, 2)
            extra_lbl = np.array([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL])
        elif len(pts) > 0:
            extra_pts = np.zeros((1, 2))
            extra_lbl = np.array([PAD_POINT_LABEL])
        else:
            raise ValueError("a SAM prompt needs at least one point or a box but got neither")
        coords = self.apply_coords(np.concatenate([pts, extra_pts]), original_size)
        return (coords[None].astype(np.float32), np.concatenate([lbl, extra_lbl])[None].astype(np.float32))

    def decoder_inputs(
        self,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        box: np.ndarray | None,
        original_size: tuple[int, int],
        *,
        mask_input: np.ndarray | None = None,
        embeddings: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """The whole decoder feed, keyed by the graph's input names (``C.SAM_DEC_IN_*``).

        Args:
            points, labels, box, original_size: as in :meth:`decoder_prompt`.
            mask_input: float32 ``[1, 1, 256, 256]`` low-res logits of a previous answer, or None (then zeros
                and ``has_mask_input = 0``).
            embeddings: float32 ``[1, 256, 64, 64]`` from the encoder; included under ``image_embeddings``
                when given (the adapter may route it separately).

        Returns:
            ``point_coords`` f32 ``[1, M, 2]``, ``point_labels`` f32 ``[1, M]``, ``mask_input`` f32
            ``[1, 1, 256, 256]``, ``has_mask_input`` f32 ``[1]``, ``orig_im_size`` f32 ``[2]`` = ``(H, W)``
            [, ``image_embeddings``].
        """
        coords, point_labels = self.decoder_prompt(points, labels, box, original_size)
        low = C.SAM_LOW_RES_SIZE
        if mask_input is None:
            mask = np.zeros((1, 1, low, low), np.float32)
            has_mask = np.zeros((1,), np.float32)
        else:
            mask = np.asarray(mask_input, np.float32)
            if mask.shape != (1, 1, low, low):
                raise ValueError(f"mask_input must be [1, 1, {low}, {low}] but has shape {mask.shape}")
            has_mask = np.ones((1,), np.float32)
        feed = {
            C.SAM_DEC_IN_POINT_COORDS: coords,
            C.SAM_DEC_IN_POINT_LABELS: point_labels,
            C.SAM_DEC_IN_MASK_INPUT: mask,
            C.SAM_DEC_IN_HAS_MASK_INPUT: has_mask,
            C.SAM_DEC_IN_ORIG_IM_SIZE: np.asarray(original_size[:2], np.float32),
        }
        if embeddings is not None:
            feed[C.SAM_DEC_IN_EMBEDDINGS] = np.asarray(embeddings, np.float32)
        return feed

    def _scales(self, original_size: tuple[int, int]) -> tuple[float, float]:
        """``(new_w / old_w, new_h / old_h)``: per-axis because rounding makes them differ slightly."""
        old_h, old_w = int(original_size[0]), int(original_size[1])
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.long_side)
        return new_w / old_w, new_h / old_h
