"""comfyui-memora: ComfyUI entry point. Wires the V3 extension and the front end; nothing else."""

from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
