"""Names, defaults and limits shared by the exporters, the pipeline, the Triton configs, the client and the
docs.

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
CHARACTERS_MODEL = "isekai_characters"  # the registered characters as JSON, for clients
# The decoupled twin of ENSEMBLE_MODEL: the same inputs, progress responses, then the same outputs (gRPC
# streaming).
STREAM_MODEL = "isekai_stream"

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
# unet and text_encoder (not graph inputs): the character whose weights run the request, as NAME@REVISION
# (ensemble/characters.py: Character.key); empty or absent means the base model.
SD_IN_CHARACTER = "character"
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
# The SAM encoder's global attention is exported 8 query rows of the 64x64 map at a time (512 queries against
# all 4096 keys): vit_h's score buffers shrink from 1 GiB to 128 MiB each, same numbers
# (export/sam_attention.py). 64 (the whole map at once) exports segment-anything's attention unchanged.
SAM_ATTENTION_QUERY_ROWS = 8

# The UNet's self-attention is exported one head at a time ("head": SD 1.5's 8 heads make [B, N, N] score
# buffers of 103 MB instead of one [B, 8, N, N] of 822 MB at a 448x512 crop, same numbers;
# export/sd_attention.py); "none" exports diffusers' attention unchanged (every head at once).
SD_ATTENTION_SLICINGS = ("head", "none")
SD_ATTENTION_SLICING = "head"

# glibc's mmap threshold for the server's processes (ServerOptions.malloc_mmap_threshold): 128 KiB is glibc's
# own starting value, fixed so that it no longer rises (up to 32 MiB) as onnxruntime frees big buffers; larger
# blocks then go back to the kernel when freed (bench/server_memory.py measures it).
MALLOC_MMAP_THRESHOLD = 128 * 1024

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
# steps and guidance follow the scheduler the repository was exported with (diffusion/pipeline.json
# "scheduler"): DPM-Solver++ multistep by default, diffusers' LCMScheduler after `isekai export sd --lcm-lora`
# (few-step latent-consistency sampling: 4 steps, guidance 1 = the prompt's prediction alone, one batch-1 UNet
# call per step).
DPM_SCHEDULER = "DPMSolverMultistepScheduler"
LCM_SCHEDULER = "LCMScheduler"
DEFAULT_SCHEDULER = DPM_SCHEDULER
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
LCM_STEPS = 4
LCM_GUIDANCE = 1.0
# scheduler class name -> (steps, guidance) a request gets when it leaves them out.
SCHEDULER_DEFAULTS = {
    DPM_SCHEDULER: (DEFAULT_STEPS, DEFAULT_GUIDANCE),
    LCM_SCHEDULER: (LCM_STEPS, LCM_GUIDANCE),
}
# What travels between preprocess and diffusion for an option the request left out: the diffusion model, which
# knows the exported scheduler, fills in that scheduler's default (an explicit 0 is refused by the
# validators).
STEPS_UNSET = 0
GUIDANCE_UNSET = 0.0
DEFAULT_STRENGTH = 0.75
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
# Repository URLs Triton downloads itself (S3, Google Cloud Storage, Azure): isekai serve passes them through.
REMOTE_REPOSITORY_SCHEMES = ("s3://", "gs://", "as://")
# How long isekai serve lets in-flight requests finish after SIGTERM/SIGINT (--grace, seconds).
DEFAULT_DRAIN_GRACE_S = 60.0
# isekai serve runs Triton with explicit model control, the model-repository API closed behind this header
# (the caller's --admin-key, or a random key only the supervisor holds): it is how a dead Python-backend
# stub's model is reloaded and how the public models are unloaded first on shutdown.
ADMIN_KEY_HEADER = "isekai-admin-key"
# The Triton APIs behind that key: loading/unloading models, and changing the server's trace and log settings
# (read-only metadata, health, statistics and inference stay open).
RESTRICTED_APIS = ("model-repository", "trace", "logging")
# Triton's gRPC endpoint expects restricted-protocol headers with this prefix (HTTP takes the header as it
# is): gRPC callers send "triton-grpc-protocol-isekai-admin-key: KEY".
GRPC_RESTRICTED_HEADER_PREFIX = "triton-grpc-protocol-"
# Unloaded first when isekai serve drains, in this order: readiness goes false and new requests are refused at
# once, while the requests already inside them finish. Readiness turns false with the first unload, so the
# other model takes requests for the moment between the two calls: the mask-only model goes first, as a click
# that slips through costs milliseconds and a swap minutes.
PUBLIC_MODELS = (SEGMENT_MODEL, ENSEMBLE_MODEL, STREAM_MODEL)
# A config parameter the supervisor changes to make Triton really reload a model (a load of an unchanged model
# keeps its instances, dead stub included).
RELOAD_PARAMETER = "isekai_reload"
# After the public models drained on shutdown, how long Triton may take to unload the rest before its process
# group is killed (seconds): an instance whose stub died never finishes unloading on Triton 2.51.
SHUTDOWN_UNLOAD_S = 15.0
# How often isekai serve looks for dead stubs and a dead server (seconds).
SUPERVISOR_INTERVAL_S = 0.5
# A zombie stub, or a loaded model seen without any live stub, is taken for a crash only when it stays so this
# long (seconds): a reload can leave a model stubless for a moment between its config stub and the new
# instance's (seen in a CI run, ~1-2 s), and a stub that exited normally is a zombie until Triton reaps it
# (caught in CI under load).
STUB_DEATH_CONFIRM_S = 5.0
# The Python backend's stub executable (one process per model instance, children of tritonserver).
PYTHON_STUB_NAME = "triton_python_backend_stub"

# ---------------------------------------------------------------------------------------------------------
# Reliability: deadlines of model-to-model calls, the embedding cache's encoder identity, load shedding.
# ---------------------------------------------------------------------------------------------------------
# The SAM embedding cache, one Python model that both preprocess instances ask through BLS (a cache inside
# preprocess would tie every click to the one instance a new photo's encode is blocking).
EMBEDDING_CACHE_MODEL = "embedding_cache"
# How long one BLS call may go unanswered when the request set no timeout of its own (seconds; isekai/serving/
# triton.py). Above the longest call seen on CPU (a vit_h encode waiting behind another: ~45 s; a UNet call
# behind another request's steps: ~25 s), so only a stuck model reaches it.
BLS_TIMEOUT_S = 300.0
# The request parameter a caller of sam_encoder sets to the graph identity it keys the embedding with
# (ensemble/cache.py: graph_identity); the default profile's adapter refuses the request when it serves
# another graph (re-exported, not yet reloaded), and the refusal's message carries GRAPH_MISMATCH.
GRAPH_PARAMETER = "isekai_graph"
GRAPH_MISMATCH = "serves another graph than its repository holds"

# ---------------------------------------------------------------------------------------------------------
# Image decoding/encoding, mask cleanup, crops and compositing (ensemble/images.py, masks.py, crops.py,
# compose.py). Fractions are of the image's (or the mask's) size so the behaviour does not depend on
# resolution.
# ---------------------------------------------------------------------------------------------------------
# Pillow format names the decoder opens (JPEG includes MPO camera files); anything else (EPS, PSD, ...) is
# refused without reaching its decoder.
IMAGE_INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
JPEG_QUALITY = 92
WEBP_QUALITY = 90
# Longest side each encoder can write (libjpeg's JPEG_MAX_DIMENSION, libwebp's WEBP_MAX_DIMENSION); PNG has no
# such limit. An upscaled result can pass them: the request is refused before any model runs.
ENCODER_MAX_SIDE = {"jpeg": 65500, "webp": 16383}
# A cleaned mask covering less than this fraction of the image means "no person found" (not an error).
PERSON_MIN_AREA_FRACTION = 0.001
# Islands smaller than this fraction of the mask's area are dropped unless a positive click is near them.
MASK_MIN_ISLAND_FRACTION = 0.01
# Holes smaller than this fraction of the mask's area are filled unless a negative click is inside them.
MASK_MAX_HOLE_FRACTION = 0.01
# "Near a positive click": within this fraction of the image's long side (at least MASK_CLICK_RADIUS_MIN_PX).
MASK_CLICK_RADIUS_FRACTION = 0.02
MASK_CLICK_RADIUS_MIN_PX = 4
# LaMa's hole is the person mask dilated by this fraction of the image's long side (at least the minimum):
# SAM's mask is upsampled from 256x256, so its edge is uncertain by a few pixels, and leftovers look worse
# than a bigger hole.
MASK_DILATE_FRACTION = 0.015
MASK_DILATE_MIN_PX = 4
# LaMa crop (IOPaint's crop strategy): the hole's box plus a margin of context, scaled down so its long side
# is at most LAMA_WORKING_SIZE, padded to LAMA_MODULO. Margin = max(MIN_PX (IOPaint's default), FRACTION x box
# long side).
LAMA_WORKING_SIZE = 1024
LAMA_CROP_MARGIN_PX = 128
LAMA_CROP_MARGIN_FRACTION = 0.5
# Person crop for img2img: the person's box plus a margin, widened to at least this short/long ratio (SD 1.x
# draws poorly below ~384 px on a side), scaled (up or down) to SD_NATIVE_SIZE on the long side, padded to
# SD_SIZE_MULTIPLE.
PERSON_CROP_MARGIN_FRACTION = 0.1
PERSON_CROP_MARGIN_MIN_PX = 8
PERSON_CROP_MIN_ASPECT = 0.75
# Feather of the character's silhouette, in pixels of the SD crop (so it scales with the person, not the
# photo).
COMPOSE_FEATHER_PX = 4.0
# Where compose's silhouette of the generated character comes from (compose/config.pbtxt parameter
# "silhouette"): the person's own mask carried into the crop (no SAM call), or SAM run again on the generated
# crop, prompted by the person's box. bench/silhouette.py measures both; the person's mask holds up on every
# check random weights allow, and saves a SAM encode per swap.
SILHOUETTE_SOURCES = ("person_mask", "sam")
DEFAULT_SILHOUETTE = "person_mask"
# A SAM silhouette overlapping the person's mask less than this (IoU) is SAM missing the character: the
# person's mask is used instead (img2img redraws the person where they stood).
SILHOUETTE_MIN_IOU = 0.5
# When no person is found the stages still run (an ensemble cannot skip a step): on inputs this small.
PLACEHOLDER_SIDE = 64
# Character names (the character store looks them up; this keeps paths and odd bytes out of it).
CHARACTER_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"

# ---------------------------------------------------------------------------------------------------------
# Stable Diffusion graphs and the diffusion loop (export/sd.py, ensemble/diffusion.py,
# ensemble/characters.py).
# ---------------------------------------------------------------------------------------------------------
# The UNet halves the latent three times and its up path concatenates skips, so exported UNets take latent
# sides that are multiples of 8, i.e. pixel sides that are multiples of SD_VAE_FACTOR * 8.
SD_SIZE_MULTIPLE = 64
# numpy dtype names of the exported graphs' non-float inputs (the serving code builds its tensors with these).
TEXT_IDS_DTYPE = "int32"  # text_encoder input_ids (TensorRT and Triton prefer int32 indices)
# unet timestep: float so every scheduler (also fractional-timestep ones) fits
UNET_TIMESTEP_DTYPE = "float32"
# Guidance below 1 is not classifier-free guidance (1 means the prompt's prediction alone).
MIN_GUIDANCE = 1.0
# Bytes of characters' weights the unet / text_encoder models keep loaded beside the base graph, least
# recently used out first (config parameters character_adapter_bytes / character_graph_bytes): LoRA adapters
# (a rank-64 SD 1.5 UNet LoRA is ~100 MB in float32), and the own graphs of full fine-tunes (an SD 1.5 UNet is
# 3.4 GB in float32).
CHARACTER_ADAPTER_BYTES = 2 * 1024**3
CHARACTER_GRAPH_BYTES = 4 * 1024**3
# Which UNet layers the exported graph gives LoRA slots (export/lora_slots.py): the attention projections,
# every layer of the transformer blocks, or every Linear and Conv2d.
LORA_TARGET_FAMILIES = ("attention", "transformer", "all")
DEFAULT_LORA_TARGETS = "all"
MAX_SEED = 2**63 - 1  # seeds are INT64 on the wire; negative ones are refused

# ---------------------------------------------------------------------------------------------------------
# LaMa graph (export/lama.py).
# ---------------------------------------------------------------------------------------------------------
# Smallest LaMa input side: at 1/LAMA_MODULO scale the 3x3 reflect-padded convolutions need 2 pixels.
LAMA_MIN_SIDE = 2 * LAMA_MODULO

# ---------------------------------------------------------------------------------------------------------
# Real-ESRGAN (export/esrgan.py, ensemble/upscale.py).
# ---------------------------------------------------------------------------------------------------------
UPSCALE_MODEL = "upscale"  # optional: see OPTIONAL_ONNX_MODELS
# The isekai ensemble's last step: the optional upscale of the scene (BLS calls to UPSCALE_MODEL), then
# encoding.
FINISH_MODEL = "finish"
# Exported graphs a repository may lack: their model loads anyway (isekai.serving.optional_onnx_model) and
# answers UNAVAILABLE until the graph is exported, so repositories made before them, or by users without the
# checkpoint, still start (a model failing to load makes tritonserver exit). Not in ONNX_MODELS: served by a
# Python adapter in every profile, so no TensorRT plan is built for them.
OPTIONAL_ONNX_MODELS = (UPSCALE_MODEL,)
# upscale: image f32 [1,3,H,W] RGB in 0..1 -> upscaled f32 [1,3,sH,sW] (s = the checkpoint's scale; unclamped)
ESRGAN_IN_IMAGE = "image"
ESRGAN_OUT_UPSCALED = "upscaled"
# Tiling as Real-ESRGAN's inference does it (its --tile 512 --tile_pad 10): each tile is run with this much
# context on every side, and only its own part is pasted, so tiles join without seams.
UPSCALE_TILE = 512
UPSCALE_TILE_PAD = 10
# Largest upscaled image (pixels): a 4096x4096 photo at x2; x4 of anything above 2048x2048 is refused.
MAX_UPSCALED_PIXELS = 8192 * 8192
# The isekai model's optional ``upscale`` input: the result's size over the photo's (1 = no upscale).
DEFAULT_UPSCALE = 1
UPSCALE_FACTORS = (1, 2, 4)
# Side of the image the finish step sends the exported graph once per request to learn its scale (output side
# / this): a multiple of every RRDBNet's unshuffle factor (1, 2, 4), and costs nothing to run.
UPSCALE_PROBE_SIDE = 4

# ---------------------------------------------------------------------------------------------------------
# isekai_stream (model_repository/isekai_stream, isekai/serving/ensemble_steps.py, ensemble/preview.py).
# ---------------------------------------------------------------------------------------------------------
# The stage a stream reports before its swap starts (waiting for a worker) and with its last data response;
# the stages in between are the isekai ensemble's step models, in the order its config wires them.
STREAM_STAGE_QUEUED = "queued"
STREAM_STAGE_DONE = "done"
# What each ensemble step costs, in UNet steps (for the progress fraction; rough, from bench/results on CPU):
# the diffusion step costs this plus one per denoising step. A step not listed costs 1.
STREAM_STAGE_COST = {
    PREPROCESS_MODEL: 2.0,  # a SAM encode when the photo is not cached
    SAM_DECODER_MODEL: 0.1,
    PREPARE_MODEL: 0.1,
    LAMA_MODEL: 1.0,
    DIFFUSION_MODEL: 2.0,  # VAE encode and decode
    COMPOSE_MODEL: 0.2,  # masks and a paste (with silhouette "sam" also a SAM encode of the character's crop)
    FINISH_MODEL: 0.2,
}
# A preview of the character (latents mapped to RGB) every this many denoising steps, and after the last one.
STREAM_PREVIEW_EVERY = 2
# Swaps one isekai_stream instance runs at once (its config's max_concurrent_swaps); more wait as "queued".
STREAM_MAX_CONCURRENT = 2
# Swaps that may wait for one of those at once; one more is refused at once with UNAVAILABLE "Exceeds maximum
# queue size" (Triton's words for a full queue, which clients read as "busy, retry later").
STREAM_MAX_WAITING = 2
# Stable Diffusion 1.x latents (scaled, [4]) -> RGB in about -1..1: a linear map fitted to the VAE's decoder
# (the factors ComfyUI previews SD 1.5 with). Rows: latent channels; columns: R, G, B.
SD_LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)

# ---------------------------------------------------------------------------------------------------------
# The page (isekai web, client/web/): a client of Triton like the CLI, holding each visitor's photo and
# result.
# ---------------------------------------------------------------------------------------------------------
DEFAULT_WEB_HOST = "127.0.0.1"
DEFAULT_WEB_PORT = 7860
# Visitors' sessions kept at once (least recently used out first), and the bytes of photos and results they
# may hold together: a visitor whose session was dropped is asked to upload the photo again.
WEB_MAX_SESSIONS = 64
WEB_MAX_SESSION_BYTES = 512 * 1024 * 1024

# ---------------------------------------------------------------------------------------------------------
# Load shedding (model_repository/*/config.pbtxt, isekai/client/client.py).
# ---------------------------------------------------------------------------------------------------------
# The queue of these steps of the public ensembles holds at most this many requests (config.pbtxt:
# dynamic_batching { default_queue_policy { max_queue_size ... } }); one more is refused at once with
# UNAVAILABLE "Exceeds maximum queue size" instead of waiting, and the requests held there (and their images)
# stay bounded. A request whose client set a timeout is also refused from a queue it has waited in that long
# ("Request timeout expired").
SEGMENT_MASK_MODEL = "segment_mask"  # isekai_segment's last step
# Not diffusion and lama: Triton 2.51 schedules them together (both read only prepare's tensors), and its
# ensemble scheduler mishandles a step refused beside another (core PR #466, fixed in 2026): the swap never
# finishes and a freed request tracker is used again, which hung the whole server in a 10x overload test here.
# Their own queues stay unbounded until the server is upgraded (prepare bounds diffusion's instead: below);
# the steps before and after them, each scheduled alone, are bounded.
STEP_QUEUE_SIZES = {
    PREPROCESS_MODEL: 16,
    SAM_DECODER_MODEL: 16,
    SEGMENT_MASK_MODEL: 16,
    PREPARE_MODEL: 8,
    COMPOSE_MODEL: 8,
    FINISH_MODEL: 8,
}
# Steps of the public ensembles that Triton 2.51 schedules beside another, so they must never refuse a
# request.
UNBOUNDED_STEPS = (LAMA_MODEL, DIFFUSION_MODEL)
# So prepare bounds them instead (ensemble/admission.py): it refuses a swap with UNAVAILABLE while this many
# swaps wait in diffusion's queue (besides the two its instances run), read from Triton's gauge
# nv_inference_pending_request_count on the metrics endpoint. The endpoint's URL comes from this environment
# variable (the embedded server sets it, and isekai serve and k8s's entrypoint run that server), else
# Triton's default port on loopback; a read that takes longer than ADMISSION_READ_TIMEOUT_S admits the swap.
DIFFUSION_MAX_WAITING = 4
METRICS_URL_ENV = "ISEKAI_METRICS_URL"
ADMISSION_READ_TIMEOUT_S = 1.0
# What a client treats as "busy, retry later" (isekai/client/client.py): Triton's own words for a full queue
# and for a request that waited past its timeout, both with status UNAVAILABLE.
BUSY_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")
# IsekaiClient's retries of a refused request (an idempotent one: the same seed gives the same bytes): at most
# this many tries, waiting 1, 2, 4, ... s (with jitter, at most RETRY_MAX_DELAY_S) between them.
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 1.0
RETRY_MAX_DELAY_S = 10.0
# A client's own deadline comes this long after the one it tells the server (seconds): the server's error,
# which names the stage that ran out of time, arrives before the client gives up with a bare
# DEADLINE_EXCEEDED.
CLIENT_DEADLINE_MARGIN_S = 5.0
# Requests waiting in a step's queue longer than this are refused (UNAVAILABLE "Request timeout expired";
# config: default_queue_policy default_timeout_microseconds). A backstop above any wait the bounded queues
# allow; a client's shorter timeout (its request's ``timeout`` parameter) takes its place.
QUEUE_TIMEOUT_S = 600
