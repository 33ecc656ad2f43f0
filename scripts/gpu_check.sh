#!/usr/bin/env bash
# GPU acceptance in one command (see scripts/gpu_check.py); `--cpu --tiny` is the CI mode.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$(bash "$repo/scripts/setup_host.sh")"
export PISA_HOST_PYTHON PISA_COMFY_DIR
exec "$PISA_HOST_PYTHON" "$repo/scripts/gpu_check.py" "$@"
