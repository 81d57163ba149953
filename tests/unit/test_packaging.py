"""Packaging: requirements.txt (what ComfyUI-Manager installs) and .comfyignore (what `comfy node pack` leaves out)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pathspec

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_requirements_txt_lists_pyprojects_runtime_dependencies_unpinned():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]
    assert reqs == deps
    assert not any(c in r for r in reqs for c in "<>=~!;[")


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ln for ln in out.splitlines() if ln]


def test_comfyignore_ships_the_runtime_and_leaves_out_tests_benchmarks_ci_and_build_code():
    spec = pathspec.PathSpec.from_lines("gitwildmatch", (ROOT / ".comfyignore").read_text().splitlines())
    files = _tracked()
    shipped = [f for f in files if not spec.match_file(f)]
    left_out = [f for f in files if spec.match_file(f)]
    runtime = ("__init__.py", "nodes/", "memora/", "memora_batch/", "web/", "example_workflows/", "pyproject.toml",
               "requirements.txt", "LICENSE", "README.md")
    for f in files:
        if f.startswith(runtime) and not f.endswith("weights/samples.png"):
            assert f in shipped, f
    for weights in ("memora/micro/weights/manifest.json", "memora/micro/weights/unet_original.safetensors",
                    "memora/micro/weights/unet_esd_x.safetensors"):
        assert weights in shipped
    for prefix in ("tests/", "benchmarks/", ".ci/", "memora_build/", "docs/img/"):
        assert any(f.startswith(prefix) for f in left_out), prefix
        assert not any(f.startswith(prefix) for f in shipped), prefix
    assert "scripts/demo.py" in shipped and "scripts/build_micro_world.py" in left_out
