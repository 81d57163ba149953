"""The test tiers and the pack root on sys.path, without ComfyUI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_a_unit_test_cannot_import_comfyui():
    with pytest.raises(ImportError, match="move it to tests/comfy"):
        import comfy.model_management  # noqa: F401
    with pytest.raises(ImportError, match="'nodes'"):
        import nodes  # noqa: F401


def test_the_pack_root_does_not_shadow_comfyuis_nodes_module(tmp_path):
    """ComfyUI runs with its own folder first on sys.path and imports its top-level ``nodes`` module; it loads this
    pack as a package from custom_nodes/. The pack's __init__ appends the pack root (for ``import memora``), so
    ``import nodes`` must still give ComfyUI's nodes.py, not the pack's nodes/ folder."""
    fake_comfy = tmp_path / "ComfyUI"
    fake_comfy.mkdir()
    (fake_comfy / "nodes.py").write_text("WHO = 'comfyui'\n")
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(fake_comfy)!r})
        spec = importlib.util.spec_from_file_location("comfyui_memora_pack", {str(ROOT / '__init__.py')!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = pack
        spec.loader.exec_module(pack)
        import memora, nodes
        print(sys.path.index({str(ROOT)!r}) > sys.path.index({str(fake_comfy)!r}))
        print(nodes.__file__)
        print(memora.__file__)
        print(sorted(pack.__all__))
    """)
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    after, nodes_file, memora_file, exported = res.stdout.splitlines()
    assert after == "True"  # appended, never prepended
    assert Path(nodes_file) == fake_comfy / "nodes.py"
    assert Path(memora_file).resolve() == ROOT / "memora" / "__init__.py"
    assert exported == "['WEB_DIRECTORY', 'comfy_entrypoint']"
