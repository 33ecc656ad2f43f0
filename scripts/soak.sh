#!/usr/bin/env bash
# 50-prompt soak against one real ComfyUI server (tiny weights unless --ckpt/--pisa); see scripts/soak.py.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$(bash "$repo/scripts/setup_host.sh")"
export PISA_HOST_PYTHON PISA_COMFY_DIR
exec "$PISA_HOST_PYTHON" "$repo/scripts/soak.py" "$@"
