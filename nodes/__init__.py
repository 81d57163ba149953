"""ComfyUI glue: V3 node classes that translate ComfyUI types into calls to ``memora``.

Every public module in this package may define ``NODES`` (a list of io.ComfyNode classes); they are collected here
in module-name order, so adding a module adds its nodes without editing this file."""

from __future__ import annotations

import importlib
import pkgutil

from comfy_api.latest import ComfyExtension, io


def node_classes() -> list[type[io.ComfyNode]]:
    classes: list[type[io.ComfyNode]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        classes.extend(getattr(module, "NODES", []))
    return classes


class MemoRaExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_classes()


async def comfy_entrypoint() -> MemoRaExtension:
    return MemoRaExtension()
