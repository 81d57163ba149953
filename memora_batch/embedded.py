"""ComfyUI's own executor, in this process: boot a checkout, load custom node packs, run API-format graphs.

Used by the test harness and by ``memora-batch`` in its default (embedded) mode. Works with ComfyUI 0.3.64 and
0.33 (the differences are feature-detected: PromptExecutor's cache arguments, sync/async output caches)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

from .backend import RunResult


class GraphValidationError(RuntimeError):
    """ComfyUI refused the graph before running it (unknown node types, missing inputs, bad values)."""

    def __init__(self, error: Any, node_errors: Any):
        self.error = error
        self.node_errors = node_errors
        msg = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        details = error.get("details", "") if isinstance(error, dict) else ""
        parts = [f"ComfyUI rejected the graph: {msg}" + (f" ({details})" if details else "")]
        for node_id, ne in (node_errors or {}).items():
            for e in ne.get("errors", []):
                parts.append(f"  node {node_id} ({ne.get('class_type', '?')}): {e.get('message')}: {e.get('details', '')}")
        super().__init__("\n".join(parts))


class _ServerStub:
    """What PromptExecutor needs from a server when there is none: a client id and a message sink."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.events: list[tuple[str, Any]] = []
        self.listener = None

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))
        if self.listener is not None:
            self.listener(event, data)


_BOOTED: Optional["EmbeddedComfy"] = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def find_comfyui(path: Optional[str] = None) -> Optional[Path]:
    """A ComfyUI checkout: ``path``, else $COMFYUI_PATH, else ~/comfy/ComfyUI (comfy-cli's default workspace)."""
    for cand in (path, os.environ.get("COMFYUI_PATH"), os.path.expanduser("~/comfy/ComfyUI")):
        if cand and (Path(cand) / "main.py").is_file() and (Path(cand) / "comfy").is_dir():
            return Path(cand).resolve()
    return None


class EmbeddedComfy:
    """One ComfyUI per process (its modules are global). ``boot`` returns the running one if already booted."""

    def __init__(self, comfy_path: Path, custom_nodes: Iterable[Path] = (), base_directory: Optional[Path] = None,
                 cpu: Optional[bool] = None, init_custom_nodes: bool = False):
        self.comfy_path = Path(comfy_path).resolve()
        self.custom_nodes = [Path(p) for p in custom_nodes]
        self.base_directory = Path(base_directory) if base_directory else None
        self.cpu = cpu
        self.init_custom_nodes = init_custom_nodes
        self.executor = None
        self.server = _ServerStub()
        self.version = "unknown"
        self.log_path: Optional[Path] = None

    @classmethod
    def boot(cls, comfy_path: Path, custom_nodes: Iterable[Path] = (), base_directory: Optional[Path] = None,
             cpu: Optional[bool] = None, init_custom_nodes: bool = False) -> "EmbeddedComfy":
        """``custom_nodes``: pack folders to load; ``init_custom_nodes``: also load every pack in the checkout's
        custom_nodes folder (as the server does; a listed pack already loaded from there is not loaded twice)."""
        global _BOOTED
        if _BOOTED is not None:
            if _BOOTED.comfy_path != Path(comfy_path).resolve():
                raise RuntimeError(f"ComfyUI {_BOOTED.comfy_path} is already loaded in this process; "
                                   f"cannot also load {comfy_path} (run one checkout per process)")
            return _BOOTED
        inst = cls(comfy_path, custom_nodes, base_directory, cpu, init_custom_nodes)
        inst._start()
        _BOOTED = inst
        return inst

    def _start(self):
        path = str(self.comfy_path)
        if path not in sys.path:
            sys.path.insert(0, path)
        from comfy.cli_args import args

        cpu = self.cpu
        if cpu is None:
            try:
                import torch

                cpu = not torch.cuda.is_available()
            except Exception:  # pragma: no cover - torch is required anyway
                cpu = True
        if cpu:
            args.cpu = True
        if hasattr(args, "disable_api_nodes"):
            args.disable_api_nodes = True
        import utils.extra_config  # noqa: F401  (must precede `import nodes`)
        import folder_paths

        if self.base_directory is not None:
            base = self.base_directory
            for sub in ("output", "input", "temp", "models"):
                (base / sub).mkdir(parents=True, exist_ok=True)
            folder_paths.set_output_directory(str(base / "output"))
            folder_paths.set_input_directory(str(base / "input"))
            folder_paths.set_temp_directory(str(base / "temp"))
            for name in list(folder_paths.folder_names_and_paths.keys()):
                if name in ("custom_nodes", "configs"):
                    continue
                target = base / "models" / name
                target.mkdir(parents=True, exist_ok=True)
                folder_paths.add_model_folder_path(name, str(target), is_default=True)
        if self.base_directory is None:
            # the checkout's own model folders, plus extra_model_paths.yaml as main.py reads it
            yaml_path = self.comfy_path / "extra_model_paths.yaml"
            if yaml_path.is_file():
                try:
                    utils.extra_config.load_extra_path_config(str(yaml_path))
                except Exception as e:  # a broken user file should not stop a batch; say so
                    logging.getLogger(__name__).warning("could not read %s: %s", yaml_path, e)
        import execution
        import nodes

        try:
            from comfyui_version import __version__ as version
            self.version = version
        except Exception:
            pass
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=self.init_custom_nodes, init_api_nodes=False))
        loaded = {Path(m).resolve() for m in getattr(nodes, "LOADED_MODULE_DIRS", {}).values()}
        for p in self.custom_nodes:
            if self.init_custom_nodes and Path(p).resolve() in loaded:
                continue
            ok = asyncio.run(nodes.load_custom_node(str(p)))
            if not ok:
                raise RuntimeError(f"ComfyUI failed to import the custom node pack at {p} (see the log above)")
        params = inspect.signature(execution.PromptExecutor.__init__).parameters
        if "cache_args" in params:
            self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                     cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        else:
            self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)
        logging.getLogger(__name__).info("embedded ComfyUI %s from %s", self.version, self.comfy_path)

    # -- running graphs -------------------------------------------------------------------------------------------
    def validate(self, prompt: dict, prompt_id: Optional[str] = None):
        import execution

        valid = asyncio.run(execution.validate_prompt(prompt_id or str(uuid.uuid4()), prompt, None))
        if not valid[0]:
            raise GraphValidationError(valid[1], valid[3])
        return valid[2]

    # -- the console ----------------------------------------------------------------------------------------------
    def listen(self, listener) -> None:
        """``listener(event, data)`` gets the executor's events while graphs run (nodes executing, cached; the
        nodes' own events); None stops."""
        self.server.listener = listener

    def log_to(self, path: "Optional[str | Path]") -> Optional[Path]:
        """ComfyUI's own output while graphs run (its logging at INFO, prints, per-sampling progress bars) goes to
        the end of the file ``path`` instead of the console; None: to the console again. Returns the path."""
        self.log_path = Path(path) if path is not None else None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(f"==== memora-batch: ComfyUI {self.version} from {self.comfy_path}, output logged from "
                        f"{_now()} ====\n")
        return self.log_path

    @contextlib.contextmanager
    def _output(self):
        if self.log_path is None:
            yield
            return
        root = logging.getLogger()
        with open(self.log_path, "a", encoding="utf-8", buffering=1) as f:
            handler = logging.StreamHandler(f)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            level = root.level
            consoles = [h for h in root.handlers if type(h) is logging.StreamHandler
                        and getattr(h, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)]
            for h in consoles:
                root.removeHandler(h)
            root.addHandler(handler)
            if level > logging.INFO:
                root.setLevel(logging.INFO)
            try:
                with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                    yield
            finally:
                root.removeHandler(handler)
                root.setLevel(level)
                for h in consoles:
                    root.addHandler(h)

    def run(self, prompt: dict, prompt_id: Optional[str] = None, extra_data: Optional[dict] = None) -> RunResult:
        prompt_id = prompt_id or str(uuid.uuid4())
        outputs = self.validate(prompt, prompt_id)
        self.server.events.clear()
        extra = dict(extra_data or {})
        if self.server.listener is not None:
            extra.setdefault("client_id", "memora-batch")  # the executor sends its events only to a client
        with self._output():
            self.executor.execute(prompt, prompt_id, extra, outputs)
        history = getattr(self.executor, "history_result", {}) or {}
        error = None
        for event, data in self.executor.status_messages:
            if event in ("execution_error", "execution_interrupted"):
                error = {"event": event, **data}
        return RunResult(prompt_id, bool(self.executor.success), history.get("outputs", {}), error)

    def node_outputs(self, node_id: str) -> Optional[list]:
        """The Python values a node produced in the last run (first item of each output), or None if not cached."""
        cache = self.executor.caches.outputs
        value = cache.get_local(node_id) if hasattr(cache, "get_local") else cache.get(node_id)
        if inspect.isawaitable(value):
            value = asyncio.run(value)
        if value is None:
            return None
        if hasattr(value, "outputs"):
            value = value.outputs
        return [v[0] if isinstance(v, list) and len(v) == 1 else v for v in value]

    @staticmethod
    def node_class(name: str):
        import nodes

        return nodes.NODE_CLASS_MAPPINGS.get(name)
