"""Names, defaults and limits shared by the exporters, the pipeline, the Triton configs, the client and the docs.

Everything a config.pbtxt, a model.py, a test or the README quotes is defined here once. Public request and
response tensor names live in :mod:`isekai.client.api`; this module holds the internal model names, the
exported graphs' tensor names, and the numbers.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------------
# Triton model names (folders under model_repository/).
# ---------------------------------------------------------------------------------------------------------
ENSEMBLE_MODEL = "isekai"
SEGMENT_MODEL = "isekai_segment"

PREPROCESS_MODEL = "preprocess"
SAM_ENCODER_MODEL = "sam_encoder"
SAM_DECODER_MODEL = "sam_decoder"
PREPARE_MODEL = "prepare"
LAMA_MODEL = "lama"
DIFFUSION_MODEL = "diffusion"
COMPOSE_MODEL = "compose"
TEXT_ENCODER_MODEL = "text_encoder"
UNET_MODEL = "unet"
VAE_ENCODER_MODEL = "vae_encoder"
VAE_DECODER_MODEL = "vae_decoder"

# Models whose artifact is an exported ONNX graph at <repository>/<model>/1/model.onnx.
ONNX_MODELS = (
    SAM_ENCODER_MODEL,
    SAM_DECODER_MODEL,
    LAMA_MODEL,
    TEXT_ENCODER_MODEL,
    UNET_MODEL,
    VAE_ENCODER_MODEL,
    VAE_DECODER_MODEL,
)
ONNX_FILENAME = "model.onnx"
PLAN_FILENAME = "model.plan"
MODEL_VERSION = "1"

# ---------------------------------------------------------------------------------------------------------
# Exported graphs' tensor names (issue #3: the serving code, the client and the docs depend on these).
# ---------------------------------------------------------------------------------------------------------
# sam_encoder: image f32 [1,3,1024,1024] (normalized and padded as SamPredictor does) -> image_embeddings
SAM_ENC_IN_IMAGE = "image"
SAM_ENC_OUT_EMBEDDINGS = "image_embeddings"
# sam_decoder: segment-anything's own ONNX decoder interface.
SAM_DEC_IN_EMBEDDINGS = "image_embeddings"
SAM_DEC_IN_POINT_COORDS = "point_coords"
SAM_DEC_IN_POINT_LABELS = "point_labels"
SAM_DEC_IN_MASK_INPUT = "mask_input"
SAM_DEC_IN_HAS_MASK_INPUT = "has_mask_input"
SAM_DEC_IN_ORIG_IM_SIZE = "orig_im_size"
SAM_DEC_OUT_MASKS = "masks"
SAM_DEC_OUT_IOU = "iou_predictions"
SAM_DEC_OUT_LOW_RES = "low_res_masks"
# lama: image f32 [1,3,H,W] in 0..1, mask f32 [1,1,H,W] (>0 is the hole) -> inpainted f32 [1,3,H,W] in 0..1
LAMA_IN_IMAGE = "image"
LAMA_IN_MASK = "mask"
LAMA_OUT_INPAINTED = "inpainted"
# text_encoder: input_ids [B,77] -> last_hidden_state [B,77,D]
TEXT_IN_IDS = "input_ids"
TEXT_OUT_HIDDEN = "last_hidden_state"
# unet: sample f32 [B,4,h,w], timestep [B], encoder_hidden_states f32 [B,77,D] -> out_sample
UNET_IN_SAMPLE = "sample"
UNET_IN_TIMESTEP = "timestep"
UNET_IN_HIDDEN = "encoder_hidden_states"
UNET_OUT_SAMPLE = "out_sample"
# vae_encoder: sample f32 [B,3,H,W] in -1..1 -> latent_mean (unscaled mean of the latent distribution)
VAE_ENC_IN_SAMPLE = "sample"
VAE_ENC_OUT_MEAN = "latent_mean"
# vae_decoder: latent_sample (already divided by the scaling factor) -> sample f32 [B,3,H,W] in -1..1
VAE_DEC_IN_LATENT = "latent_sample"
VAE_DEC_OUT_SAMPLE = "sample"

# ---------------------------------------------------------------------------------------------------------
# SAM geometry (segment-anything's constants; the exported encoder takes a padded 1024 square).
# ---------------------------------------------------------------------------------------------------------
SAM_IMAGE_SIZE = 1024
SAM_EMBEDDING_SIZE = 64
SAM_EMBEDDING_CHANNELS = 256
SAM_LOW_RES_SIZE = 256
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
SAM_MASK_THRESHOLD = 0.0

# ---------------------------------------------------------------------------------------------------------
# Stable Diffusion.
# ---------------------------------------------------------------------------------------------------------
SD_TOKEN_LENGTH = 77
SD_LATENT_CHANNELS = 4
SD_VAE_FACTOR = 8  # pixels per latent cell
SD_NATIVE_SIZE = 512  # the person's crop is diffused at this long side
LAMA_MODULO = 8  # LaMa needs H and W divisible by this

# ---------------------------------------------------------------------------------------------------------
# Request defaults (documented in the README; optional inputs fall back to these).
# ---------------------------------------------------------------------------------------------------------
DEFAULT_CHARACTER = "default"
DEFAULT_STEPS = 25
DEFAULT_STRENGTH = 0.75
DEFAULT_GUIDANCE = 7.5
DEFAULT_SEED = 0
DEFAULT_FORMAT = "png"
OUTPUT_FORMATS = ("png", "jpeg", "webp")

# ---------------------------------------------------------------------------------------------------------
# Request limits (validators raise ValueError naming the input, the value and this limit).
# ---------------------------------------------------------------------------------------------------------
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
MIN_IMAGE_SIDE = 16
MAX_POINTS = 16
MAX_STEPS = 100
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 1000

# ---------------------------------------------------------------------------------------------------------
# Server-side embedding cache (shared by isekai and isekai_segment).
# ---------------------------------------------------------------------------------------------------------
EMBEDDING_CACHE_ENTRIES = 32
EMBEDDING_CACHE_BYTES = 256 * 1024 * 1024

# ---------------------------------------------------------------------------------------------------------
# The embedded server's defaults.
# ---------------------------------------------------------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"
DEFAULT_GRPC_PORT = 8001
DEFAULT_HTTP_PORT = 8000
DEFAULT_METRICS_PORT = 8002
