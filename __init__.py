"""comfyui-memora: ComfyUI entry point. Wires the V3 extension and the front end; nothing else.

The method package is always imported by one name, ``memora`` (nodes/, memora_batch, scripts and tests alike), so a
process never holds two copies of it. ComfyUI loads this folder as a package without putting it on ``sys.path``; the
pack root is therefore appended (never prepended: ComfyUI's own top-level ``nodes`` module must keep winning over this
pack's ``nodes/`` folder). Importing this file outside ComfyUI (pytest collecting the repository, tools) works and
loads no node."""

from __future__ import annotations

import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))


def _ensure_memora_importable() -> None:
    if _ROOT not in sys.path:
        sys.path.append(_ROOT)
    import memora

    found = os.path.dirname(os.path.dirname(os.path.abspath(memora.__file__)))
    if os.path.realpath(found) != os.path.realpath(_ROOT):
        raise ImportError(
            f"comfyui-memora at {_ROOT} found another package named 'memora' first, at {found}; uninstall that one "
            f"(pip uninstall comfyui-memora) or install this pack with 'pip install -e {_ROOT}'")


_ensure_memora_importable()

if __package__ and importlib.util.find_spec("comfy_api") is not None:
    # inside ComfyUI: import the nodes now, so a broken install fails loudly in ComfyUI's start-up log
    from .nodes import comfy_entrypoint
else:
    async def comfy_entrypoint():
        raise ImportError("comfyui-memora's nodes run inside ComfyUI: its comfy_api package is not importable here")


WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
