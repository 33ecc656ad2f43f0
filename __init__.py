"""ComfyUI-PiSA-SR entry point: ComfyUI calls ``comfy_entrypoint`` (V3 API) and serves ``web/``."""
WEB_DIRECTORY = "./web"

# ComfyUI always imports this folder as a package. pytest, run from a clone whose folder name is not a Python
# identifier (``ComfyUI-PiSA-SR``, ``tmp.x1y2``), imports this file as a lone module; there is nothing to register then.
if __package__:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
