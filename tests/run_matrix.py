#!/usr/bin/env python3
"""The project's test command: the whole suite against every ComfyUI checkout given.

    python tests/run_matrix.py [pytest args...]

Checkouts: COMFYUI_PATHS (colon-separated), default ~/comfy/ComfyUI and ~/comfy/ComfyUI-0.33 where they exist.
The first checkout runs everything (unit tests included); each further checkout runs the ComfyUI-dependent
directories again (ComfyUI's modules are global, so one pytest process per checkout). Prints the counts per version,
which versions were absent, and a closing 'N passed, N failed, N skipped' line; exits non-zero on any failure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TESTS = Path(__file__).resolve().parent
COMFY_DIRS = ["comfy", "server", "workflows", "browser"]


def candidates() -> list[Path]:
    env = os.environ.get("COMFYUI_PATHS")
    if env:
        return [Path(p).expanduser() for p in env.split(":") if p]
    return [Path.home() / "comfy" / "ComfyUI", Path.home() / "comfy" / "ComfyUI-0.33"]


def version(path: Path) -> str:
    m = re.search(r'__version__\s*=\s*"([^"]+)"', (path / "comfyui_version.py").read_text())
    return m.group(1) if m else "unknown"


def run(paths: list[str], comfy: Path | None, extra: list[str], tag: str) -> dict:
    junit = TESTS.parent / "test-artifacts" / f"junit-{tag}.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if comfy is not None:
        env["COMFYUI_PATH"] = str(comfy)
    else:
        env["COMFYUI_PATH"] = str(TESTS / "no-comfyui-here")
    cmd = [sys.executable, "-m", "pytest", "-c", str(TESTS / "pytest.ini"), "--rootdir", str(TESTS),
           f"--junitxml={junit}", f"--basetemp={junit.parent / ('tmp-' + tag)}", *paths, *extra]
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
    results = []
    existing_comfy_dirs = [str(TESTS / d) for d in COMFY_DIRS if (TESTS / d).is_dir()]
    if not present:
        results.append(("no ComfyUI (ComfyUI tests skipped)", run([str(TESTS)], None, extra, "no-comfyui")))
    for i, path in enumerate(present):
        ver = version(path)
        targets = [str(TESTS)] if i == 0 else existing_comfy_dirs
        results.append((f"ComfyUI {ver} ({path})", run(targets, path, extra, f"comfyui-{ver}")))
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
