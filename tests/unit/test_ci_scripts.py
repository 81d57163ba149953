"""The test command's own scripts: the tier plan of tests/run_matrix.py and ComfyUI's suite command in
scripts/check_comfyui_suite.py (timing checks off in both the without-pack and with-pack runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load(rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _checkout(tmp_path: Path, name: str, conftest: str | None, version: str = "0.3.64") -> Path:
    c = tmp_path / name
    (c / "tests").mkdir(parents=True)
    (c / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    if conftest is not None:
        (c / "tests" / "conftest.py").write_text(conftest)
    return c


def test_suite_command_turns_timing_checks_off_where_the_checkout_can(tmp_path):
    suite = _load("scripts/check_comfyui_suite.py", "check_comfyui_suite_under_test")
    with_flag = _checkout(tmp_path, "new", 'def pytest_addoption(parser):\n'
                                           '    parser.addoption("--skip-timing-checks", action="store_true")\n')
    without = _checkout(tmp_path, "old", "def pytest_addoption(parser):\n    pass\n")
    bare = _checkout(tmp_path, "bare", None)
    cmd = suite.suite_command(with_flag)
    assert cmd[1:5] == ["-m", "pytest", "tests/execution", "-q"] and cmd[-1] == "--skip-timing-checks"
    assert "--skip-timing-checks" not in suite.suite_command(without)
    assert "--skip-timing-checks" not in suite.suite_command(bare)


def test_run_matrix_runs_the_unit_tier_once_without_comfyui_then_the_comfyui_tiers_per_checkout(tmp_path):
    matrix = _load("tests/run_matrix.py", "run_matrix_under_test")
    a = _checkout(tmp_path, "a", None, "0.3.64")
    b = _checkout(tmp_path, "b", None, "0.33.0")
    runs = matrix.plan([a, b])
    assert [r[3] for r in runs] == ["unit", "comfyui-0.3.64", "comfyui-0.33.0", "cluster-0.3.64"]
    assert runs[0][1] == [str(ROOT / "tests" / "unit")] and runs[0][2] is None
    comfy_dirs = [str(ROOT / "tests" / d) for d in ("comfy", "server", "workflows", "browser")]
    assert runs[1][1] == comfy_dirs and runs[1][2] == a and runs[2][2] == b
    # the cluster tier (Ray, submitit) once, on the first checkout
    assert runs[3][1] == [str(ROOT / "tests" / "cluster")] and runs[3][2] == a
    assert not any(str(ROOT / "tests" / "unit") in r[1] for r in runs[1:])
    none = matrix.plan([])
    assert [r[3] for r in none] == ["unit", "no-comfyui"] and none[1][2] is None
    assert none[1][1] == comfy_dirs + [str(ROOT / "tests" / "cluster")]
    cmd = matrix.pytest_command(["x"], ["-k", "y"], tmp_path / "j.xml", "t")
    assert cmd[3:7] == ["-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT / "tests")]
