#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this): on a fresh machine it first builds the cached
# ComfyUI test host(s) (scripts/setup_host.sh: 0.3.75, and 0.30.0 when asked; each a venv with its torch, the
# references, pytest and playwright) and installs Debian's chromium for tests/host/test_browser.py (apt-get, as root
# or through sudo).
#   bash scripts/run_tests.sh                  everything on 0.3.75: core and host tiers
#   PISA_HOSTS="0.3.75 0.30.0" bash scripts/run_tests.sh    then the host tier on 0.30.0 too (not yet CI's default:
#                                              the two hosts together have not been shown well inside CI's 90 minutes)
#   bash scripts/run_tests.sh --core           the pure-torch core tier only: no ComfyUI host, no browser (seconds)
#   bash scripts/run_tests.sh -x -k sampler    other arguments go to pytest (each host's run gets them)
#   PISA_HOSTS=0.30.0 bash scripts/run_tests.sh tests/host/test_x.py    the hosts to run, first one first
# The first host runs everything asked; each later one runs the host tier minus the tests marked `one_host` (they
# cannot depend on the host; tests/conftest.py). Exit status: the first failing run's pytest status, else 0
# (5 only when no run selected a test).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
core=0
for a in "$@"; do [ "$a" = "--core" ] && core=1; done
read -r -a hosts <<< "${PISA_HOSTS:-0.3.75}"
[ "$core" = 1 ] && hosts=("${hosts[0]}")
declare -A py dir
for h in "${hosts[@]}"; do
  vars="$(bash "$repo/scripts/setup_host.sh" "$h")"
  py[$h]="$(sed -n 's/^PISA_HOST_PYTHON=//p' <<< "$vars")"
  dir[$h]="$(sed -n 's/^PISA_COMFY_DIR=//p' <<< "$vars")"
done
if [ "$core" = 0 ] && ! command -v chromium >/dev/null 2>&1; then
  echo "run_tests: installing chromium from Debian (for tests/host/test_browser.py)" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null; } ||
    { echo "run_tests: could not install chromium with apt-get (needs root or sudo); install it, or run --core" >&2
      exit 1; }
fi
cd "$repo"
status=5 second=0
for h in "${hosts[@]}"; do
  echo "run_tests: ComfyUI $h ($([ "$second" = 0 ] && echo "everything asked" || echo "host tier, once-only tests left out"))" >&2
  start=$(date +%s)
  rc=0
  PISA_HOST_PYTHON="${py[$h]}" PISA_COMFY_DIR="${dir[$h]}" PISA_SECOND_HOST="$second" \
    "${py[$h]}" -m pytest "$@" || rc=$?
  echo "run_tests: ComfyUI $h: pytest exit $rc, $(( $(date +%s) - start ))s" >&2
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then
    [ "$status" = 0 ] || [ "$status" = 5 ] && status=$rc
  elif [ "$rc" = 0 ] && [ "$status" = 5 ]; then
    status=0
  fi
  second=1
done
exit "$status"
