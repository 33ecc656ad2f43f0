#!/usr/bin/env bash
# Run example_workflows/pisa_sr_basic through a real headless ComfyUI (tiny generated weights unless --ckpt/--pisa).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$(bash "$repo/scripts/setup_host.sh")"
export PISA_HOST_PYTHON PISA_COMFY_DIR
exec "$PISA_HOST_PYTHON" "$repo/scripts/run_example.py" "$@"
