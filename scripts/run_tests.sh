#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this): on a fresh machine it first builds the cached
# ComfyUI test hosts (scripts/setup_host.sh: 0.3.75 and 0.30.0, each a venv with its torch, the references, pytest
# and playwright) and installs Debian's chromium for tests/host/test_browser.py (apt-get, as root or through sudo).
#   bash scripts/run_tests.sh                  everything: core and host tiers on 0.3.75, then the host tier on 0.30.0
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
read -r -a hosts <<< "${PISA_HOSTS:-0.3.75 0.30.0}"
[ "$core" = 1 ] && hosts=("${hosts[0]}")
declare -A py dir
for h in "${hosts[@]}"; do
  vars="$(bash "$repo/scripts/setup_host.sh" "$h")"
  py[$h]="$(sed -n 's/^PISA_HOST_PYTHON=//p' <<< "$vars")"
  dir[$h]="$(sed -n 's/^PISA_COMFY_DIR=//p' <<< "$vars")"
done
tcmalloc() { dpkg -L libtcmalloc-minimal4 2>/dev/null | grep -m1 '/libtcmalloc_minimal\.so\.4$' || true; }
if [ "$core" = 0 ]; then
  # chromium for tests/host/test_browser.py; tcmalloc for the test servers only (PISA_SERVER_PRELOAD,
  # scripts/comfy_server.py): glibc gives every large CPU tensor fresh zeroed pages (a 512 px VAE decode: 2.4 M page
  # faults, ~5 s of kernel time), tcmalloc reuses them, and a queued run takes ~30% less time, with the same result
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  [ -n "$(tcmalloc)" ] || need+=(libtcmalloc-minimal4)
  if [ "${#need[@]}" != 0 ]; then
    echo "run_tests: installing ${need[*]} from Debian" >&2
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null; } ||
      echo "run_tests: apt-get could not install ${need[*]} (needs root or sudo)" >&2
  fi
  if ! command -v chromium >/dev/null 2>&1; then
    echo "run_tests: chromium is missing (tests/host/test_browser.py needs it); install it, or run --core" >&2
    exit 1
  fi
  export PISA_SERVER_PRELOAD="$(tcmalloc)" TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=$((1 << 40))  # no log line per GiB
  [ -n "$PISA_SERVER_PRELOAD" ] || echo "run_tests: no tcmalloc: the test servers use glibc's malloc (slower)" >&2
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
