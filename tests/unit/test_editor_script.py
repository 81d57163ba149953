"""scripts/editor.sh: starts the chosen checkout's main.py with the front end that checkout pins (from the cache
folder, never from the shared environment) in a workspace holding only this pack, the checkout's models linked.
Run here against a stand-in checkout whose main.py records how it was started (starting the real editor takes
30-50 s on 2 cores: measured by hand, see README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "editor.sh"
FAKE_MAIN = """import json, os, sys
json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "pythonpath": os.environ.get("PYTHONPATH", "")},
          open(os.environ["EDITOR_PROBE"], "w"))
"""


def _setup(tmp_path: Path, version: str = "9.8.7"):
    checkout = tmp_path / "ComfyUI-x"
    (checkout / "comfy").mkdir(parents=True)
    (checkout / "main.py").write_text(FAKE_MAIN)
    (checkout / "requirements.txt").write_text(f"comfyui-frontend-package=={version}\ntorch\n")
    (checkout / "comfy" / "cli_args.py").write_text('parser.add_argument("--database-url", type=str)\n')
    cache = tmp_path / "cache"
    static = cache / "frontend" / version / "comfyui_frontend_package" / "static"
    static.mkdir(parents=True)
    (static / "index.html").write_text("<title>ComfyUI</title>")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    env = {**os.environ, "MEMORA_VENV": str(venv), "MEMORA_CACHE": str(cache), "EDITOR_PROBE": str(tmp_path / "p"),
           "COMFYUI_PATH": str(tmp_path / "elsewhere")}
    env.pop("MEMORA_EDITOR_HOME", None)
    return checkout, static, cache, env


def test_editor_starts_the_checkout_with_its_pinned_front_end_in_its_own_workspace(tmp_path):
    checkout, static, cache, env = _setup(tmp_path)
    proc = subprocess.run(["bash", str(SCRIPT), "--comfyui", str(checkout), "--port", "8299", "--", "--verbose"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads((tmp_path / "p").read_text())
    args = seen["argv"]
    home = cache / "editor" / checkout.name
    assert args[args.index("--front-end-root") + 1] == str(static)
    assert args[args.index("--base-directory") + 1] == str(home)
    assert args[args.index("--port") + 1] == "8299" and args[-1] == "--verbose"
    assert args[args.index("--database-url") + 1] == f"sqlite:///{home}/user/comfyui.db"
    assert seen["cwd"] == str(checkout) and seen["pythonpath"].split(":")[0] == str(ROOT)
    assert (home / "custom_nodes" / "comfyui-memora").resolve() == ROOT
    assert sorted(p.name for p in (home / "custom_nodes").iterdir()) == ["comfyui-memora"]
    assert (home / "models").resolve() == (checkout / "models").resolve()
    assert "http://127.0.0.1:8299" in proc.stderr


def test_editor_refuses_what_it_cannot_start(tmp_path):
    checkout, _static, _cache, env = _setup(tmp_path)
    missing = subprocess.run(["bash", str(SCRIPT), "--comfyui", str(tmp_path / "nothing")], env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no ComfyUI checkout at" in missing.stderr
    unknown = subprocess.run(["bash", str(SCRIPT), "--bogus"], env=env, capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown option --bogus" in unknown.stderr
    (checkout / "requirements.txt").write_text("torch\n")
    unpinned = subprocess.run(["bash", str(SCRIPT), "--comfyui", str(checkout)], env=env, capture_output=True,
                              text=True, timeout=60)
    assert unpinned.returncode == 1 and "pins no comfyui-frontend-package version" in unpinned.stderr
    assert not (tmp_path / "p").exists()
