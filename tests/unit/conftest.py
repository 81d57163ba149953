"""The unit tier needs no ComfyUI: while a test in tests/unit runs, importing one of ComfyUI's top-level modules is an
ImportError naming it (whether or not a checkout exists, and even when an earlier tier in the same process loaded
ComfyUI), so a unit test that would quietly depend on ComfyUI fails instead. Tests that need ComfyUI go in
tests/comfy (or tests/server, tests/workflows, tests/browser)."""

from __future__ import annotations

import importlib.abc
import sys

import pytest

COMFYUI_MODULES = frozenset({
    "comfy", "comfy_api", "comfy_api_nodes", "comfy_config", "comfy_execution", "comfy_extras", "comfyui_version",
    "execution", "folder_paths", "latent_preview", "node_helpers", "nodes", "server",
})


class _NoComfyUI(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in COMFYUI_MODULES:
            raise ImportError(f"unit tests run without ComfyUI, but this test imports ComfyUI's {name!r}: "
                              f"move it to tests/comfy", name=name)
        return None


@pytest.fixture(autouse=True)
def no_comfyui():
    """Hide ComfyUI's modules (already-imported ones included) for the duration of each unit test."""
    hidden = {k: v for k, v in sys.modules.items() if k.partition(".")[0] in COMFYUI_MODULES}
    for k in hidden:
        del sys.modules[k]
    finder = _NoComfyUI()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for k in [k for k in sys.modules if k.partition(".")[0] in COMFYUI_MODULES]:
            del sys.modules[k]
        sys.modules.update(hidden)
