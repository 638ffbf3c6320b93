#!/bin/sh
# The container's entrypoint: run tritonserver on the model repository named by the environment.
#
#   MODEL_REPOSITORY          s3://bucket/path, gs://bucket/path, as://account/container/path, or a mount
#   ISEKAI_PROFILE            model config profile: "gpu" reads <model>/configs/gpu.pbtxt; "" = config.pbtxt
#                             (unset means gpu: this image is the GPU image)
#   ISEKAI_EXIT_TIMEOUT_S     seconds in-flight requests get after SIGTERM (Triton --exit-timeout-secs); the
#                             pod's terminationGracePeriodSeconds follows the drain rule in k8s/README.md
#   ISEKAI_GRPC_MAX_CONNECTION_AGE_MS   gRPC connections are closed (GOAWAY) after this age, so clients
#                             that reach the pods through a ClusterIP Service reconnect and reach new pods too
#   ISEKAI_LONGEST_REQUEST_S  how long an RPC may still finish on a connection past its max age (also the
#                             drain rule's "longest request")
# Extra arguments are passed to tritonserver as they are (they win: Triton takes the last of a repeated flag).
set -eu

: "${MODEL_REPOSITORY:=/models}"
: "${ISEKAI_EXIT_TIMEOUT_S:=60}"
: "${ISEKAI_GRPC_MAX_CONNECTION_AGE_MS:=300000}"
: "${ISEKAI_LONGEST_REQUEST_S:=120}"
PROFILE="${ISEKAI_PROFILE-gpu}"

set -- \
    --model-repository="${MODEL_REPOSITORY}" \
    --http-port=8000 \
    --grpc-port=8001 \
    --metrics-port=8002 \
    --allow-metrics=true \
    --strict-readiness=true \
    --exit-timeout-secs="${ISEKAI_EXIT_TIMEOUT_S}" \
    --grpc-max-connection-age="${ISEKAI_GRPC_MAX_CONNECTION_AGE_MS}" \
    --grpc-max-connection-age-grace="$((ISEKAI_LONGEST_REQUEST_S * 1000))" \
    ${PROFILE:+--model-config-name="${PROFILE}"} \
    "$@"

# exec: tritonserver is PID 1 and receives the kubelet's SIGTERM itself (it drains, then exits).
exec "${TRITONSERVER:-tritonserver}" "$@"
