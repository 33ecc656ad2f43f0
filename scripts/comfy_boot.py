"""Import ComfyUI in-process (CPU) in main.py's boot order, for scripts that build tiny weights or run graphs."""
from __future__ import annotations

import os
import sys


def boot(comfy_dir: str | None = None, base_directory: str | None = None):
    comfy_dir = comfy_dir or os.environ["PISA_COMFY_DIR"]
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.options  # noqa: F401
    from comfy.cli_args import args

    args.cpu = True
    if base_directory:
        args.base_directory = base_directory
    import utils.extra_config  # noqa: F401  (before nodes.py shadows `utils`)
    import utils.install_util  # noqa: F401
    return args
