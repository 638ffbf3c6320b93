"""The public API of the isekai deployment: model names and tensor names, named once.

The model configs (``model_repository/isekai*/config.pbtxt``), the tests and the README use exactly these; a
test checks the configs against this module. Never rename one silently: clients in the field depend on them.
"""

from __future__ import annotations

from isekai import constants as C

SWAP_MODEL = C.ENSEMBLE_MODEL  # the whole swap
SEGMENT_MODEL = C.SEGMENT_MODEL  # the mask only, for the click-look-click loop
CHARACTERS_MODEL = C.CHARACTERS_MODEL  # the registered characters (JSON), e.g. for a picker
STREAM_MODEL = C.STREAM_MODEL  # the whole swap with progress (decoupled: gRPC streaming only); inputs as
#                                SWAP_MODEL

# --- inputs (both models) -----------------------------------------------------------------------------------
IMAGE = "image"  # BYTES [1] encoded PNG/JPEG/WebP
POINTS = "points"  # FP32 [-1,2] clicks, (x, y) in original image pixels
LABELS = "labels"  # INT32 [-1] 1 = the person, 0 = not the person
BOX = "box"  # FP32 [4] optional (x0, y0, x1, y1) in original pixels

# --- inputs (isekai only; all optional, defaults in isekai.constants) ---------------------------------------
CHARACTER = "character"  # BYTES [1]
PROMPT = "prompt"  # BYTES [1] replaces the character's prompt
STRENGTH = "strength"  # FP32 [1] in (0, 1]
STEPS = "steps"  # INT32 [1]
GUIDANCE = "guidance"  # FP32 [1]
SEED = "seed"  # INT64 [1]
FORMAT = "format"  # BYTES [1] png | jpeg | webp
UPSCALE = "upscale"  # INT32 [1] 1 (off) | 2 | 4: the result's size over the photo's (Real-ESRGAN)

# --- inputs (isekai_segment only) ---------------------------------------------------------------------------
MASK_INPUT = "mask_input"  # FP32 [1,1,256,256] optional: the previous answer's low_res_mask

# --- inputs (characters only) -------------------------------------------------------------------------------
NAME = "name"  # BYTES [1] optional: one character; without it, all of them

# --- outputs ------------------------------------------------------------------------------------------------
RESULT = "result"  # BYTES [1] the encoded scene with the character
MASK = "mask"  # BYTES [1] PNG of the person mask, original size
BACKGROUND = "background"  # BYTES [1] the encoded scene without the person
SCORE = "score"  # FP32 [1] the chosen mask's predicted IoU
LOW_RES_MASK = "low_res_mask"  # FP32 [1,1,256,256] (isekai_segment) feed back as mask_input
CHARACTERS = "characters"  # BYTES [1] (characters) JSON list: name, kind, prompt, negative_prompt, default,
#                            bytes, revision, source, problem (why it cannot be drawn, or null)
# isekai_stream's responses: every one carries STAGE and PROGRESS; some diffusion ones a PREVIEW; the last
# data response (final flag) the SWAP_OUTPUTS.
STAGE = "stage"  # BYTES [1] an isekai step's model name, "queued" before the swap starts, "done" with the
#                  outputs
PROGRESS = "progress"  # FP32 [1] the swap's progress in 0..1, never decreasing, at least one response per
#                        UNet step
PREVIEW = "preview"  # BYTES [1] a small PNG of the character being drawn (its latents mapped to RGB)

# The API's optional inputs (documented defaults); the others are required. The configs declare every input
# optional so that a missing required one reaches preprocess, which refuses it naming the input (Triton 2.51
# only counts inputs, and an ensemble missing a required one failed with "unexpected deadlock").
SWAP_INPUTS = (IMAGE, POINTS, LABELS, BOX, MASK_INPUT, CHARACTER, PROMPT, STRENGTH, STEPS, GUIDANCE, SEED,
               FORMAT, UPSCALE)
SWAP_OPTIONAL = (BOX, MASK_INPUT, CHARACTER, PROMPT, STRENGTH, STEPS, GUIDANCE, SEED, FORMAT, UPSCALE)
SWAP_OUTPUTS = (RESULT, MASK, BACKGROUND, SCORE)
SEGMENT_INPUTS = (IMAGE, POINTS, LABELS, BOX, MASK_INPUT)
SEGMENT_OPTIONAL = (BOX, MASK_INPUT)
SEGMENT_OUTPUTS = (MASK, SCORE, LOW_RES_MASK)
CHARACTERS_INPUTS = (NAME,)
CHARACTERS_OPTIONAL = (NAME,)
CHARACTERS_OUTPUTS = (CHARACTERS,)
STREAM_INPUTS = SWAP_INPUTS  # exactly isekai's: a unit test holds the two configs equal
STREAM_OPTIONAL = SWAP_OPTIONAL
STREAM_OUTPUTS = (STAGE, PROGRESS, PREVIEW, *SWAP_OUTPUTS)

# Triton data type of every public tensor.
DTYPES = {
    IMAGE: "BYTES",
    POINTS: "FP32",
    LABELS: "INT32",
    BOX: "FP32",
    CHARACTER: "BYTES",
    PROMPT: "BYTES",
    STRENGTH: "FP32",
    STEPS: "INT32",
    GUIDANCE: "FP32",
    SEED: "INT64",
    FORMAT: "BYTES",
    UPSCALE: "INT32",
    MASK_INPUT: "FP32",
    RESULT: "BYTES",
    MASK: "BYTES",
    BACKGROUND: "BYTES",
    SCORE: "FP32",
    LOW_RES_MASK: "FP32",
    NAME: "BYTES",
    CHARACTERS: "BYTES",
    STAGE: "BYTES",
    PROGRESS: "FP32",
    PREVIEW: "BYTES",
}
# Dims as in the configs (max_batch_size 0: one image per request).
DIMS = {
    IMAGE: [1],
    POINTS: [-1, 2],
    LABELS: [-1],
    BOX: [4],
    CHARACTER: [1],
    PROMPT: [1],
    STRENGTH: [1],
    STEPS: [1],
    GUIDANCE: [1],
    SEED: [1],
    FORMAT: [1],
    UPSCALE: [1],
    MASK_INPUT: [1, 1, C.SAM_LOW_RES_SIZE, C.SAM_LOW_RES_SIZE],
    RESULT: [1],
    MASK: [1],
    BACKGROUND: [1],
    SCORE: [1],
    LOW_RES_MASK: [1, 1, C.SAM_LOW_RES_SIZE, C.SAM_LOW_RES_SIZE],
    NAME: [1],
    CHARACTERS: [1],
    STAGE: [1],
    PROGRESS: [1],
    PREVIEW: [1],
}
