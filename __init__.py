"""ComfyUI-PiSA-SR entry point: ComfyUI calls ``comfy_entrypoint`` (V3 API) and serves ``web/``."""
from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = "./web"
__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
