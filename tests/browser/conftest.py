"""Fixtures for the browser test: the official front end at the version the ComfyUI checkout pins, a real ComfyUI
server serving it with the pack, and headless Chromium (Debian's package) driven by Playwright.

Missing pieces skip with a reason that says what to install (shown in the summary; pyproject.toml's pytest options have -ra):
  - chromium: ``apt-get update && apt-get install -y chromium`` (or CHROMIUM=/path/to/chrome)
  - the Playwright Python package: ``pip install playwright`` (its own browser download is not needed)
  - the front end: ``pip install --no-deps --target ~/.cache/comfyui-memora/frontend/<version>
    comfyui-frontend-package==<version>`` (done here on first use when PyPI is reachable)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from memora_batch.embedded import find_comfyui

COMFY_PATH = find_comfyui()
ROOT = Path(__file__).resolve().parents[2]
SUPPORT = ROOT / "tests" / "support"
CACHE = Path(os.environ.get("MEMORA_CACHE", Path.home() / ".cache" / "comfyui-memora"))
ARTIFACTS = ROOT / "test-artifacts"

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _skip(reason: str):
    print(f"\n[browser test] SKIPPED: {reason}", file=sys.stderr)
    pytest.skip(reason)


def frontend_version(comfy_path: Path) -> str | None:
    req = comfy_path / "requirements.txt"
    if not req.is_file():
        return None
    m = re.search(r"^comfyui-frontend-package\s*==\s*([\w.]+)", req.read_text(), re.M)
    return m.group(1) if m else None


def ensure_frontend(version: str) -> Path:
    """The wheel's static/ folder for ``version``, installed once under the cache with pip --target (one folder per
    version, so checkouts pinning different front ends coexist in one environment)."""
    target = CACHE / "frontend" / version
    static = target / "comfyui_frontend_package" / "static"
    if (static / "index.html").is_file():
        return static
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
           f"comfyui-frontend-package=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (tmp / "comfyui_frontend_package" / "static" / "index.html").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        _skip(f"could not install comfyui-frontend-package=={version} (the front end this ComfyUI pins): "
              f"`{' '.join(cmd[2:])}` failed: {proc.stderr.strip()[-300:]}")
    try:
        tmp.rename(target)  # atomic; another process may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return static


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        _skip("chromium is not installed: `apt-get update && apt-get install -y chromium` "
              "(or set CHROMIUM=/path/to/chromium); the front-end browser test needs it")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _skip("the playwright Python package is missing: `pip install playwright` (test extra)")
    return path


@pytest.fixture(scope="session")
def frontend_static(chromium_path) -> Path:
    version = frontend_version(COMFY_PATH)
    if version is None:
        _skip(f"{COMFY_PATH}/requirements.txt pins no comfyui-frontend-package version")
    return ensure_frontend(version)


@pytest.fixture(scope="module")
def browser_server(frontend_static, tiny_ckpt_path, tmp_path_factory):
    """A real ComfyUI server (this checkout, --cpu) with the pack, the test kit and the official front end."""
    from comfy_server import ComfyServerProcess

    base = tmp_path_factory.mktemp("browser_base")
    user = base / "user" / "default"
    (user / "workflows").mkdir(parents=True)
    # A returning user: no first-run template dialog over the canvas, no minimap over the nodes.
    (user / "comfy.settings.json").write_text(json.dumps({
        "Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "LiteGraph.Node.TooltipDelay": 200}))
    server = ComfyServerProcess(
        COMFY_PATH, base, packs={"comfyui-memora": ROOT, "memora_testkit": SUPPORT / "memora_testkit"},
        checkpoints=[tiny_ckpt_path],
        # A later --front-end-root wins over the empty one ComfyServerProcess passes.
        extra_args=("--front-end-root", str(frontend_static)))
    with server:
        yield server


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    # launch() gives Chromium a fresh temporary --user-data-dir itself (and refuses one in args); every test page
    # then gets its own context: no storage shared between pages.
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_FLAGS)
        yield b
        b.close()
