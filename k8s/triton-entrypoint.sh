#!/bin/sh
# The container's entrypoint: `isekai serve` on the model repository named by the environment.
#
# isekai serve runs tritonserver as its child and supervises it as on a single machine: on SIGTERM it unloads
# the public models first (readiness goes false, new requests are refused, those in flight finish — a swap's BLS
# calls included), then stops Triton; a Python-backend stub that dies (OOM killer, a crash) has its model
# reloaded. Plain tritonserver does neither on 2.51 (k8s/README.md, section 4).
#
#   MODEL_REPOSITORY          s3://bucket/path, gs://bucket/path, as://account/container/path, or a mount
#   ISEKAI_PROFILE            model config profile: "gpu" reads <model>/configs/gpu.pbtxt; "" = config.pbtxt
#                             (unset means gpu: this image is the GPU image)
#   ISEKAI_LONGEST_REQUEST_S  the longest request (a 50-step swap, with margin): in-flight requests get this long
#                             after SIGTERM (isekai serve --grace), and an RPC this long to finish on a connection
#                             past its max age. The pod's terminationGracePeriodSeconds follows the drain rule in
#                             k8s/README.md
#   ISEKAI_GRPC_MAX_CONNECTION_AGE_MS   gRPC connections are closed (GOAWAY) after this age, so clients
#                             that reach the pods through a ClusterIP Service reconnect and reach new pods too
#   ISEKAI_HOST, ISEKAI_HTTP_PORT, ISEKAI_GRPC_PORT, ISEKAI_METRICS_PORT   where to listen (0.0.0.0, 8000, 8001,
#                             8002): the supervisor calls Triton on these, so they are not Triton flags
#   ISEKAI_ADMIN_KEY          optional HEADER=VALUE that opens Triton's model-repository API to callers who send
#                             it; unset, only the supervisor holds a (random) key
# With a profile (the GPU image's case) Triton also exports its GPU metrics (isekai serve turns them off for CPU runs).
# Extra arguments are passed to tritonserver as they are (they win: Triton takes the last of a repeated flag).
set -eu

: "${MODEL_REPOSITORY:=/models}"
: "${ISEKAI_GRPC_MAX_CONNECTION_AGE_MS:=300000}"
: "${ISEKAI_LONGEST_REQUEST_S:=120}"
PROFILE="${ISEKAI_PROFILE-gpu}"

set -- \
    --repository="${MODEL_REPOSITORY}" \
    --host="${ISEKAI_HOST:-0.0.0.0}" \
    --http-port="${ISEKAI_HTTP_PORT:-8000}" \
    --grpc-port="${ISEKAI_GRPC_PORT:-8001}" \
    --metrics-port="${ISEKAI_METRICS_PORT:-8002}" \
    --grace="${ISEKAI_LONGEST_REQUEST_S}" \
    ${PROFILE:+--profile="${PROFILE}"} \
    ${ISEKAI_ADMIN_KEY:+--admin-key="${ISEKAI_ADMIN_KEY}"} \
    -- \
    ${PROFILE:+--allow-gpu-metrics=true} \
    --grpc-max-connection-age="${ISEKAI_GRPC_MAX_CONNECTION_AGE_MS}" \
    --grpc-max-connection-age-grace="$((ISEKAI_LONGEST_REQUEST_S * 1000))" \
    "$@"

# exec: isekai serve is the process the kubelet's SIGTERM reaches (it drains, stops Triton, then exits).
exec "${ISEKAI:-isekai}" serve "$@"
