"""A real ComfyUI server for tests: ``python main.py --cpu`` on a free port, with its own base directory.

    with ComfyServerProcess(comfy_path, base_dir, packs={"comfyui-memora": ROOT}) as server:
        server.url  # http://127.0.0.1:<port>, answering HTTP

The base directory gets custom_nodes/ (the given packs symlinked, as pack_link in conftest does), models/, input/,
output/; the server runs headless (empty --front-end-root), without API nodes. Its log is ``<base>/server.log``
(printed when it fails to start). Reusable by any test that needs a server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServerProcess:
    def __init__(self, comfy_path: Path, base: Path, packs: Optional[dict] = None,
                 checkpoints: tuple = (), port: Optional[int] = None, startup_timeout: float = 240.0,
                 extra_args: tuple = ()):
        self.comfy_path = Path(comfy_path)
        self.base = Path(base)
        self.packs = dict(packs or {})
        self.checkpoints = [Path(c) for c in checkpoints]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.base / "server.log"

    def _prepare(self):
        for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "frontend"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        for name, target in self.packs.items():
            link = self.base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(Path(target).resolve(), target_is_directory=True)
        for ckpt in self.checkpoints:
            dst = self.base / "models" / "checkpoints" / ckpt.name
            if not dst.exists():
                try:
                    os.link(ckpt, dst)
                except OSError:
                    shutil.copy2(ckpt, dst)

    def start(self) -> "ComfyServerProcess":
        self._prepare()
        cmd = [sys.executable, str(self.comfy_path / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base),
               "--front-end-root", str(self.base / "frontend"), "--disable-api-nodes", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_path), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI server did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own process group only
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
