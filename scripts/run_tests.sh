#!/usr/bin/env bash
# Run the test suite against the ComfyUI 0.3.75 host (built once and cached by scripts/setup_host.sh).
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k sampler -x`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$(bash "$repo/scripts/setup_host.sh")"
export PISA_HOST_PYTHON PISA_COMFY_DIR
cd "$repo"
exec "$PISA_HOST_PYTHON" -m pytest -p no:cacheprovider "$@"
