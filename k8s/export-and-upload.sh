#!/usr/bin/env bash
# Export the isekai model repository from your checkpoints and upload it where the pods read it.
#
#   k8s/export-and-upload.sh [--demo | --upload-only] DESTINATION
#
# DESTINATION (the pods' MODEL_REPOSITORY, k8s/base/configmap.yaml):
#   s3://BUCKET/PATH              aws s3 sync            (AWS CLI credentials)
#   gs://BUCKET/PATH              gsutil -m rsync        (gcloud credentials)
#   as://ACCOUNT/CONTAINER/PATH   az storage blob sync   (az login, or AZURE_STORAGE_KEY / _SAS_TOKEN)
#   pvc://NAMESPACE/CLAIM         tar through `kubectl exec` into a short-lived pod mounting the claim; the
#                                 claim's old content is replaced (serve it with the gpu-pvc example in
#                                 k8s/README.md: MODEL_REPOSITORY=/models)
#   /a/local/path                 a plain copy (an NFS mount, say)
#
# Checkpoints (environment; run from the repository root with the project installed, `make setup`):
#   SAM_CHECKPOINT    SAM .pth (vit_h / vit_l / vit_b)
#   LAMA_CHECKPOINT   big-lama models/best.ckpt      LAMA_CONFIG  big-lama config.yaml
#   SD_MODEL          diffusers Stable Diffusion 1.x folder (your DreamBooth fine-tune)
#   CHARACTER, PROMPT optional: register the fine-tune's character under this name with this prompt
#   ESRGAN_CHECKPOINT optional: a Real-ESRGAN .pth (RealESRGAN_x4plus_anime_6B.pth, ...) for `upscale` 2 and 4
#   REPOSITORY        where the repository is assembled (default build/model_repository); exports that
#                     exist there already are skipped by the exporters
# --demo exports small random-weight checkpoints instead (a smoke test of the cluster, not a model);
# --upload-only uploads REPOSITORY as it is.
#
# The gpu profile serves the ONNX graphs with TensorRT as onnxruntime's accelerator, building engines on the
# pod's own GPU: no engine is exported here (an engine only runs on the GPU model it was built on).
set -euo pipefail

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

mode=export
case "${1:-}" in
    --demo) mode=demo; shift ;;
    --upload-only) mode=upload; shift ;;
    -h|--help) usage 0 ;;
esac
[ $# -eq 1 ] || usage
dest=$1
repo=${REPOSITORY:-build/model_repository}
isekai=${ISEKAI:-isekai}

say() { echo "export-and-upload: $*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || { say "$1 is needed for $dest but is not installed"; exit 2; }; }

# ---- 1. export ------------------------------------------------------------------------------------------
case "$mode" in
    demo)
        "$isekai" export demo --repository "$repo"
        ;;
    export)
        missing=()
        for var in SAM_CHECKPOINT LAMA_CHECKPOINT LAMA_CONFIG SD_MODEL; do
            [ -n "${!var:-}" ] || missing+=("$var")
        done
        if [ ${#missing[@]} -gt 0 ]; then
            say "set ${missing[*]} (or use --demo / --upload-only); see --help"
            exit 2
        fi
        # The configs and Python models come from this checkout; the exporters add the graphs beside them.
        python3 -c 'import sys; from pathlib import Path; from isekai.export.demo import copy_configs
copy_configs(Path(sys.argv[1]))' "$repo"
        "$isekai" export sam --checkpoint "$SAM_CHECKPOINT" --repository "$repo"
        "$isekai" export lama --checkpoint "$LAMA_CHECKPOINT" --config "$LAMA_CONFIG" --repository "$repo"
        character=()
        if [ -n "${CHARACTER:-}" ]; then
            character=(--character "$CHARACTER" --prompt "${PROMPT:?PROMPT is required with CHARACTER}")
        fi
        "$isekai" export sd --model "$SD_MODEL" --repository "$repo" "${character[@]}"
        if [ -n "${ESRGAN_CHECKPOINT:-}" ]; then
            "$isekai" export esrgan --checkpoint "$ESRGAN_CHECKPOINT" --repository "$repo"
        fi
        ;;
esac
[ -d "$repo" ] || { say "no model repository at $repo"; exit 2; }
say "uploading $repo ($(du -sh "$repo" | cut -f1)) to $dest"

# ---- 2. upload: a mirror (files gone from the repository are deleted there too), no Python caches ------
case "$dest" in
    s3://*)
        need aws
        aws s3 sync "$repo" "$dest" --delete --exclude "*__pycache__/*"
        ;;
    gs://*)
        need gsutil
        gsutil -m rsync -r -d -x '.*__pycache__/.*' "$repo" "$dest"
        ;;
    as://*)
        need az
        rest=${dest#as://}
        account=${rest%%/*}; rest=${rest#*/}
        container=${rest%%/*}; path=${rest#"$container"}; path=${path#/}
        if [ -z "$account" ] || [ -z "$container" ]; then
            say "expected as://ACCOUNT/CONTAINER/PATH, got $dest"
            exit 2
        fi
        az storage blob sync --account-name "$account" --container "$container" --source "$repo" \
            ${path:+--destination "$path"} --delete-destination true --exclude-pattern "*__pycache__*"
        ;;
    pvc://*)
        need kubectl
        rest=${dest#pvc://}
        namespace=${rest%%/*}; claim=${rest#*/}
        [ -n "$namespace" ] && [ -n "$claim" ] && [ "$claim" != "$rest" ] \
            || { say "expected pvc://NAMESPACE/CLAIM, got $dest"; exit 2; }
        pod="isekai-upload-$$"
        kubectl -n "$namespace" apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $pod
  labels: {app.kubernetes.io/name: isekai, app.kubernetes.io/component: upload}
spec:
  restartPolicy: Never
  containers:
    - name: upload
      image: busybox:1.36
      command: ["sleep", "3600"]
      volumeMounts: [{name: models, mountPath: /models}]
  volumes:
    - name: models
      persistentVolumeClaim: {claimName: $claim}
EOF
        trap 'kubectl -n "$namespace" delete pod "$pod" --wait=false >/dev/null' EXIT
        kubectl -n "$namespace" wait --for=condition=Ready "pod/$pod" --timeout=300s
        kubectl -n "$namespace" exec "$pod" -- sh -c 'rm -rf /models/* && mkdir -p /models'
        (cd "$repo" && tar --exclude=__pycache__ -cf - .) \
            | kubectl -n "$namespace" exec -i "$pod" -- tar -xf - -C /models
        ;;
    *://*)
        say "unsupported destination $dest (s3://, gs://, as://, pvc:// or a path)"
        exit 2
        ;;
    *)
        mkdir -p "$dest"
        if command -v rsync >/dev/null 2>&1; then
            rsync -a --delete --exclude __pycache__ "$repo"/ "$dest"/
        else
            (cd "$repo" && tar --exclude=__pycache__ -cf - .) | (cd "$dest" && tar -xf -)
        fi
        ;;
esac
say "done: set MODEL_REPOSITORY=$dest in the isekai-serving ConfigMap (or your overlay) and apply"
