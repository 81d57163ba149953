"""Where jobs run: the Backend interface, its one result type, and the two local backends (ComfyUI's executor in
this process; ComfyUI servers over HTTP). The cluster backends implement the same interface: Ray
(:mod:`memora_batch.ray_backend`) and SLURM through submitit (:mod:`memora_batch.slurm`). The runner knows only the
interface: it never asks which backend it has."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


@dataclass
class RunResult:
    """What one finished prompt returned, wherever it ran."""

    prompt_id: str
    success: bool
    ui_outputs: dict = field(default_factory=dict)
    error: Optional[dict] = None
    server: str = "embedded"
    #: earlier tries of this job that ended without a result (the worker running it died): {"worker", "error"} each
    retries: list = field(default_factory=list)

    @property
    def error_message(self) -> str:
        if not self.error:
            return ""
        return f"{self.error.get('exception_type', 'error')}: {self.error.get('exception_message', '')}".strip()


#: ``on_done(job, result, seconds, started)``: called once per finished job (serialised by the backend)
OnDone = Callable[[Any, RunResult, float, str], None]
#: on_start(job, worker name or None) as a job starts
OnStart = Callable[[Any, Optional[str]], None]


class MissingExtra(ValueError):
    """An option needs an optional dependency that is not installed; says which extra installs it."""

    def __init__(self, option: str, module: str, extra: str):
        super().__init__(f"{option} needs {module}, which is not installed: pip install 'comfyui-memora[{extra}]' "
                         f"(or pip install {module}); nothing was run")


class BackendFailed(RuntimeError):
    """Every place that could run jobs failed while the batch ran (every server, every cluster worker); the jobs
    already finished are recorded, the rest are left for a rerun."""


class Backend:
    """Runs API-format graphs and says where their files went. Subclasses implement every method but
    :meth:`run_all`, whose default runs the jobs one after another through :meth:`run`."""

    #: whether :meth:`listen` delivers the executor's node events (nodes executing, cached) of the job running now:
    #: the runner then shows a bar per job (its nodes); without them one bar over the jobs, per-worker counts in its
    #: postfix
    node_events: bool = False

    def describe(self) -> str:
        """Where the jobs run, for messages: 'the embedded ComfyUI (/path)', 'server http://...'."""
        raise NotImplementedError

    def listen(self, listener: Optional[Callable[[str, Any], None]]) -> None:
        """Send node events to ``listener(event, data)`` while jobs run (None: stop); only where
        :attr:`node_events`. The default has none to send."""

    def log_to(self, path: Optional[Path]) -> Optional[Path]:
        """Send ComfyUI's own output (in this process) to the file ``path`` (None: back to the console); returns the
        path, or None where ComfyUI's output is elsewhere (servers, cluster workers), as in the default."""
        return None

    def available_types(self) -> set:
        """The node types installed where the jobs run."""
        raise NotImplementedError

    def object_info(self, node_types) -> dict:
        """/object_info entries (node definitions) of ``node_types``."""
        raise NotImplementedError

    def validate(self, prompt: dict) -> Optional[str]:
        """Why the backend would refuse this graph (its own validation, run before any job starts), or None. The
        default has no validator of its own: the runner's checks (:func:`~memora_batch.workflow.graph_problems`)
        still apply."""
        return None

    def run(self, prompt: dict, timeout: Optional[float] = None) -> RunResult:
        """Run one graph to its end. A graph ComfyUI rejects or a node that fails is a failed result, not an
        exception."""
        raise NotImplementedError

    def resolve_file(self, item: dict) -> str:
        """A UI-output file item ({filename, subfolder, type}) -> a path or URL the user can open."""
        raise NotImplementedError

    def resolve_lora(self, name: str) -> str:
        """A saved LoRA's name (models/loras relative) -> its path where known, else the name."""
        raise NotImplementedError

    def bind_results(self, results_dir: Path) -> None:
        """The run's results folder, given (locked) before the first job: a backend whose workers send files back
        or keep their own records (cluster shards) puts them under it. The default keeps nothing there."""

    def close(self) -> None:
        """Let go of what the backend holds (cluster workers, connections); the default holds nothing."""

    def run_all(self, jobs: list, prompt_of: Callable[[Any], dict], on_done: OnDone,
                job_timeout: Optional[float] = None, on_start: Optional[OnStart] = None) -> list:
        """Run ``jobs``; returns those left unrun. ``on_start(job, worker)`` as each job starts where the backend
        knows (worker: its name, or None with one place to run). A backend that can lose a worker re-runs its job
        elsewhere and lists the lost tries in :attr:`RunResult.retries`; a job that fails inside ComfyUI (its input)
        is a result, reported once."""
        for job in jobs:
            if on_start:
                on_start(job, None)
            started, t0 = now(), time.monotonic()
            result = self.run(prompt_of(job), timeout=job_timeout)
            on_done(job, result, time.monotonic() - t0, started)
        return []


def now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class EmbeddedBackend(Backend):
    """ComfyUI's executor in this process (no server). Node outputs stay cached between jobs, as in a server:
    jobs that differ only downstream (say, the evaluation seed) reuse the upstream work (inversion, training)."""

    node_events = True

    def __init__(self, comfy):
        self.comfy = comfy

    def listen(self, listener: Optional[Callable[[str, Any], None]]) -> None:
        self.comfy.listen(listener)

    def log_to(self, path: Optional[Path]) -> Optional[Path]:
        return self.comfy.log_to(path)

    @classmethod
    def boot(cls, comfy_path: Optional[str] = None, base_directory: Optional[str] = None,
             custom_nodes: tuple = (), all_custom_nodes: bool = False, cpu: Optional[bool] = None) -> "EmbeddedBackend":
        from .embedded import EmbeddedComfy, find_comfyui

        if comfy_path and find_comfyui(comfy_path) != Path(comfy_path).resolve():
            raise FileNotFoundError(f"--comfyui {comfy_path}: no ComfyUI checkout there (expected a folder with "
                                    f"main.py and comfy/)")
        path = find_comfyui(comfy_path)
        if path is None:
            raise FileNotFoundError(
                "no ComfyUI checkout found: pass --comfyui PATH, set COMFYUI_PATH, or install one with comfy-cli "
                "(`comfy --workspace ~/comfy/ComfyUI install --cpu`)")
        packs = [Path(p) for p in custom_nodes]
        own = pack_root(path)
        if own is not None and own not in packs:
            packs.append(own)
        comfy = EmbeddedComfy.boot(path, packs, base_directory=Path(base_directory) if base_directory else None,
                                   cpu=cpu, init_custom_nodes=all_custom_nodes)
        return cls(comfy)

    def describe(self) -> str:
        return f"the embedded ComfyUI ({self.comfy.comfy_path})"

    def available_types(self) -> set:
        import nodes

        return set(nodes.NODE_CLASS_MAPPINGS)

    def object_info(self, node_types) -> dict:
        from .workflow import object_info_in_process

        return object_info_in_process(node_types)

    def validate(self, prompt: dict) -> Optional[str]:
        """ComfyUI's own validation of the graph (what the executor checks first), without running anything."""
        from .embedded import GraphValidationError

        try:
            self.comfy.validate(prompt)
        except GraphValidationError as e:
            return str(e)
        return None

    def run(self, prompt: dict, timeout: Optional[float] = None) -> RunResult:
        from .embedded import GraphValidationError

        try:
            return self.comfy.run(prompt)
        except GraphValidationError as e:
            return RunResult("", False, error={"exception_type": "GraphValidationError", "exception_message": str(e)})

    def resolve_file(self, item: dict) -> str:
        import folder_paths

        base = folder_paths.get_directory_by_type(item.get("type", "output")) or folder_paths.get_output_directory()
        return str(Path(base, item.get("subfolder") or "", item["filename"]))

    def resolve_lora(self, name: str) -> str:
        import folder_paths

        return folder_paths.get_full_path("loras", name) or name


class ServerBackend(Backend):
    """One or more ComfyUI servers: one job in flight per server, a failed server's job goes to another."""

    def __init__(self, urls: list[str], timeout: float = 10.0):
        from .server_client import check_servers

        self.servers = check_servers(urls, timeout=timeout)  # ServerUnreachable before anything runs
        infos = [s.object_info() for s in self.servers]
        self._info = {k: v for k, v in infos[0].items() if all(k in i for i in infos)}

    def describe(self) -> str:
        return "server " + ", ".join(s.url for s in self.servers)

    def available_types(self) -> set:
        return set(self._info)

    def object_info(self, node_types) -> dict:
        return {t: self._info[t] for t in node_types if t in self._info}

    def run(self, prompt: dict, timeout: Optional[float] = None) -> RunResult:
        return self.servers[0].run(prompt, timeout=timeout)

    def run_all(self, jobs: list, prompt_of: Callable[[Any], dict], on_done: OnDone,
                job_timeout: Optional[float] = None, on_start: Optional[OnStart] = None) -> list:
        import sys

        from .server_client import run_jobs

        starts = {}

        def prompt_with_start(job):
            starts[id(job)] = now()
            if on_start:
                on_start(job, None)
            return prompt_of(job)

        def failed_server(server, job, err):
            print(f"memora-batch: server {server.url} failed ({err}); its job goes to another server",
                  file=sys.stderr, flush=True)

        return run_jobs(self.servers, jobs, prompt_with_start, lambda j, r, s: on_done(j, r, s, starts[id(j)]),
                        job_timeout=job_timeout, on_server_failed=failed_server)

    def resolve_file(self, item: dict) -> str:
        return self.servers[0].view_url(item) if len(self.servers) == 1 else \
            "/".join(p for p in (item.get("type", "output"), item.get("subfolder"), item["filename"]) if p)

    def resolve_lora(self, name: str) -> str:
        return name


#: node types whose upstream part (their inputs, recursively) is what jobs share: the work cached before training
AFFINITY_ANCHORS = ("MemoRaLoRATrain",)


def node_signatures(api: dict) -> dict[str, str]:
    """Each node's signature as ComfyUI's cache sees it: its class, its literal inputs and, recursively, the
    signatures of the nodes (and output slots) wired into it. Equal signatures: the same computation."""
    sigs: dict[str, str] = {}

    def sig(nid: str, stack: tuple = ()) -> str:
        if nid in sigs:
            return sigs[nid]
        node = api.get(nid) or {}
        parts = {}
        for name, value in sorted((node.get("inputs") or {}).items()):
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in api and str(value[0]) not in stack:
                parts[name] = ["link", sig(str(value[0]), stack + (nid,)), value[1]]
            else:
                parts[name] = value
        blob = json.dumps([node.get("class_type"), parts], sort_keys=True, default=str)
        sigs[nid] = hashlib.sha256(blob.encode("utf-8")).hexdigest()
        return sigs[nid]

    for nid in api:
        sig(str(nid))
    return sigs


def affinity_key(api: dict) -> str:
    """Which jobs share upstream work: a hash of the signatures (:func:`node_signatures`) of the nodes wired into
    the graph's LoRA training node(s), i.e. everything upstream of training (seed images, inversion, slerp,
    regeneration), training itself and evaluation excluded. Jobs that differ only in training steps, evaluation
    seeds or prompts share the key; a graph without a training node is its own group (its graph hash)."""
    sigs = node_signatures(api)
    upstream = sorted({sigs[str(v[0])] for n in api.values() if n.get("class_type") in AFFINITY_ANCHORS
                       for v in (n.get("inputs") or {}).values()
                       if isinstance(v, list) and len(v) == 2 and str(v[0]) in sigs})
    blob = json.dumps(upstream or sorted(sigs.values()))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def output_files(ui_outputs: dict, resolve_file: Callable[[dict], str], resolve_lora: Callable[[str], str]) -> dict:
    """{"file:<type>/<subfolder>/<name>" or "lora:<name>": path where the worker wrote it} for one result."""
    from memora.contracts import UI_LORA

    found = {}
    for ui in (ui_outputs or {}).values():
        for key, items in (ui or {}).items() if isinstance(ui, dict) else ():
            for item in items or [] if isinstance(items, list) else []:
                if key == UI_LORA:
                    found[f"lora:{item}"] = resolve_lora(str(item))
                elif isinstance(item, dict) and "filename" in item and item.get("type", "output") == "output":
                    found[file_id(item)] = resolve_file(item)
    return found


def file_id(item: dict) -> str:
    return "file:" + "/".join(p for p in (item.get("type", "output"), item.get("subfolder"), item["filename"]) if p)


def on_worker(options: dict) -> dict:
    """EmbeddedBackend.boot's options as a cluster worker applies them: without --base-directory, its own machine's
    $MEMORA_BATCH_BASE_DIRECTORY (else the checkout's own folders)."""
    import os

    opts = dict(options)
    opts["base_directory"] = opts.get("base_directory") or os.environ.get("MEMORA_BATCH_BASE_DIRECTORY") or None
    return opts


def pack_root(comfy_path: Optional[Path] = None) -> Optional[Path]:
    """The comfyui-memora pack folder: this source tree when installed editable, else the copy in custom_nodes."""
    here = Path(__file__).resolve().parent.parent
    if (here / "nodes" / "__init__.py").is_file() and (here / "__init__.py").is_file():
        return here
    if comfy_path is not None:
        for cand in sorted((Path(comfy_path) / "custom_nodes").glob("*")):
            if (cand / "nodes" / "inversion.py").is_file() and (cand / "memora").is_dir():
                return cand.resolve()
    return None
