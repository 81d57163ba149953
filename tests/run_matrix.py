#!/usr/bin/env python3
"""The project's test command: the whole suite against every ComfyUI checkout given.

    python tests/run_matrix.py [pytest args...]

Tiers: tests/unit runs once, in its own process, with COMFYUI_PATH pointing nowhere (it needs no ComfyUI; its
conftest makes importing ComfyUI an error); the ComfyUI tiers (tests/comfy, server, workflows, browser) run once per
checkout: COMFYUI_PATHS (colon-separated), default ~/comfy/ComfyUI and ~/comfy/ComfyUI-0.33 where they exist
(ComfyUI's modules are global, so one pytest process per checkout). Every run reads the one test configuration,
[tool.pytest.ini_options] in pyproject.toml. Prints the counts per run, which versions were absent, and a closing
'N passed, N failed, N skipped' line; exits non-zero on any failure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
UNIT_DIR = "unit"
COMFY_DIRS = ["comfy", "server", "workflows", "browser"]
#: ComfyUI tiers run with the first checkout present only (their start-up cost is paid once)
ONCE_DIRS = ["cluster"]
NO_COMFYUI = TESTS / "no-comfyui-here"


def candidates() -> list[Path]:
    env = os.environ.get("COMFYUI_PATHS")
    if env:
        return [Path(p).expanduser() for p in env.split(":") if p]
    return [Path.home() / "comfy" / "ComfyUI", Path.home() / "comfy" / "ComfyUI-0.33"]


def version(path: Path) -> str:
    m = re.search(r'__version__\s*=\s*"([^"]+)"', (path / "comfyui_version.py").read_text())
    return m.group(1) if m else "unknown"


def pytest_command(paths: list[str], extra: list[str], junit: Path, tag: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(TESTS),
            f"--junitxml={junit}", f"--basetemp={junit.parent / ('tmp-' + tag)}", *paths, *extra]


def plan(present: list[Path]) -> list[tuple[str, list[str], Path | None, str]]:
    """(name, test paths, ComfyUI checkout or None, tag) per pytest process: the unit tier without ComfyUI, then the
    ComfyUI tiers per checkout (with none present: once, so their skips are reported)."""
    runs = [("unit tests (no ComfyUI)", [str(TESTS / UNIT_DIR)], None, "unit")]
    comfy_dirs = [str(TESTS / d) for d in COMFY_DIRS if (TESTS / d).is_dir()]
    once_dirs = [str(TESTS / d) for d in ONCE_DIRS if (TESTS / d).is_dir()]
    if not present:
        runs.append(("no ComfyUI (ComfyUI tests skipped)", comfy_dirs + once_dirs, None, "no-comfyui"))
    for path in present:
        ver = version(path)
        runs.append((f"ComfyUI {ver} ({path})", comfy_dirs, path, f"comfyui-{ver}"))
    if present and once_dirs:
        ver = version(present[0])
        runs.append((f"cluster tier, ComfyUI {ver} ({present[0]})", once_dirs, present[0], f"cluster-{ver}"))
    return runs


def run(paths: list[str], comfy: Path | None, extra: list[str], tag: str) -> dict:
    junit = ROOT / "test-artifacts" / f"junit-{tag}.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["COMFYUI_PATH"] = str(comfy if comfy is not None else NO_COMFYUI)
    cmd = pytest_command(paths, extra, junit, tag)
    print(f"\n=== {tag}: {' '.join(cmd[3:])}", flush=True)
    rc = subprocess.call(cmd, cwd=TESTS.parent, env=env)
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "rc": rc}
    if junit.exists():
        root = ET.parse(junit).getroot()
        for suite in root.iter("testsuite"):
            tests = int(suite.get("tests", 0))
            f, e, s = int(suite.get("failures", 0)), int(suite.get("errors", 0)), int(suite.get("skipped", 0))
            counts["failed"] += f
            counts["errors"] += e
            counts["skipped"] += s
            counts["passed"] += tests - f - e - s
    return counts


def main() -> int:
    extra = sys.argv[1:]
    present, absent = [], []
    for c in candidates():
        (present if (c / "main.py").is_file() else absent).append(c)
    results = [(name, run(paths, comfy, extra, tag)) for name, paths, comfy, tag in plan(present)]
    print("\n=== test matrix")
    total = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    bad = False
    for name, c in results:
        print(f"  {name}: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped")
        for k in total:
            total[k] += c[k]
        bad |= c["rc"] not in (0, 5) or c["failed"] > 0 or c["errors"] > 0
    for a in absent:
        print(f"  absent: {a} (not tested)")
    print(f"{total['passed']} passed, {total['failed'] + total['errors']} failed, {total['skipped']} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
