"""The pack's explicit node list (nodes/__init__.py) against what is defined and what ComfyUI registers."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from pathlib import Path

from random_loras import pack_module


def test_extension_lists_every_node_class_and_comfyui_registers_exactly_those(comfy, repo_root):
    import nodes
    from comfy_api.latest import io

    pack_nodes = pack_module("nodes")
    ext = asyncio.run(pack_nodes.comfy_entrypoint())
    listed = asyncio.run(ext.get_node_list())
    listed_ids = [cls.GET_SCHEMA().node_id for cls in listed]
    assert len(listed_ids) == len(set(listed_ids)), listed_ids

    # every io.ComfyNode subclass defined in a public module of nodes/ is in the list (none forgotten)
    defined = set()
    for f in sorted((Path(repo_root) / "nodes").glob("*.py")):
        if f.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{pack_nodes.__name__}.{f.stem}")
        defined |= {c for _, c in inspect.getmembers(mod, inspect.isclass)
                    if issubclass(c, io.ComfyNode) and c.__module__ == mod.__name__}
    assert defined == set(listed), sorted(c.__name__ for c in defined ^ set(listed))

    # ComfyUI registered exactly the listed nodes for this pack, under their schema ids
    registered = {k for k, v in nodes.NODE_CLASS_MAPPINGS.items()
                  if getattr(v, "__module__", "").startswith(pack_nodes.__name__ + ".")}
    assert registered == set(listed_ids)
    assert {nodes.NODE_CLASS_MAPPINGS[i] for i in listed_ids} == set(listed)
