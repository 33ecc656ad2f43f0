#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this): on a fresh machine it first builds the cached
# ComfyUI 0.3.75 test host (scripts/setup_host.sh: venv with torch, the references, pytest and playwright) and
# installs Debian's chromium for tests/host/test_browser.py (apt-get, as root or through sudo).
#   bash scripts/run_tests.sh                  everything
#   bash scripts/run_tests.sh --core           the pure-torch core tier only: no ComfyUI host, no browser (seconds)
#   bash scripts/run_tests.sh -x -k sampler    other arguments go to pytest
# Exit status is pytest's (5: no test was selected).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
core=0
for a in "$@"; do [ "$a" = "--core" ] && core=1; done
eval "$(bash "$repo/scripts/setup_host.sh")"
export PISA_HOST_PYTHON PISA_COMFY_DIR
if [ "$core" = 0 ] && ! command -v chromium >/dev/null 2>&1; then
  echo "run_tests: installing chromium from Debian (for tests/host/test_browser.py)" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null; } ||
    { echo "run_tests: could not install chromium with apt-get (needs root or sudo); install it, or run --core" >&2
      exit 1; }
fi
cd "$repo"
exec "$PISA_HOST_PYTHON" -m pytest "$@"
