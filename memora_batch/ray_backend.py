"""``--ray``: jobs spread over a Ray cluster, one actor per worker, each with its own embedded ComfyUI.

Each worker is a Ray actor that boots the embedded backend (:class:`~memora_batch.backend.EmbeddedBackend`: ComfyUI's
executor in the actor's process, this pack loaded) once and keeps it, so ComfyUI's node cache stays warm between the
jobs it runs. The driver (the ``memora-batch`` process) plans, places and records: only it writes results.jsonl.

- **Before any job**: every worker boots and reports its ComfyUI, its node types and its host; a worker without
  ComfyUI, without this pack, or whose ComfyUI rejects a job graph (a model file missing on that machine) stops the
  run with an error naming the worker (:class:`ClusterError`).
- **Progress**: Ray sends the driver no node events (``node_events`` False): the runner shows one bar over the jobs,
  started per job through ``on_start`` with the worker's name.
- **Ctrl-C**: the jobs in flight are cancelled (without ``force``, which Ray refuses for actor tasks) and
  :meth:`RayBackend.close` kills the actors; the runner reports "interrupted; rerun to resume".
- **Placement**: jobs are grouped by :func:`~memora_batch.backend.affinity_key` (what is upstream of training); a
  worker keeps taking jobs of the groups it started while it is alive, so its cache saves that work as in one
  process. An idle worker with no group of its own takes an unstarted group, else shares the largest group left.
- **Worker loss**: a worker whose process dies (killed, node lost) is dropped; its job goes back to the queue and
  runs on another worker, the lost try listed in the record's ``retries``. After ``max_retries`` lost tries a job is
  recorded as failed. A job that fails inside ComfyUI is a result (its input is wrong), recorded once.
- **Files**: by default each finished job's output files and LoRAs are sent back and written under
  ``<results folder>/files/<job key>/`` on the driver (machines number their files on their own: one folder per job,
  nothing replaced); with ``shared_output`` the workers' output folder is a path every
  machine sees (a shared file system) and the records point there."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Callable, Optional

from .backend import (Backend, BackendFailed, MissingExtra, OnDone, OnStart, RunResult, affinity_key, file_id, now,
                      output_files)


class ClusterError(ValueError):
    """The cluster cannot run this batch (unreachable, a worker without ComfyUI or the pack, a graph a worker
    rejects); raised before any job runs, naming the worker."""


class AllWorkersFailed(BackendFailed):
    pass


def import_ray():
    try:
        import ray
    except ImportError:
        raise MissingExtra("--ray", "ray", "ray") from None
    return ray


# -- the worker (a Ray actor) ----------------------------------------------------------------------------------------
class ComfyWorker:
    """One worker: the embedded backend in this actor's process. ``options``: EmbeddedBackend.boot's arguments;
    a worker without --comfyui uses its own machine's $COMFYUI_PATH (else ~/comfy/ComfyUI), and without
    --base-directory its own $MEMORA_BATCH_BASE_DIRECTORY (else the checkout's folders)."""

    def __init__(self, name: str, options: dict):
        self.name, self.options, self.backend = name, dict(options), None

    def boot(self) -> dict:
        info = {"name": self.name, "host": socket.gethostname(), "pid": os.getpid()}
        try:
            import ray

            info["node"] = ray.get_runtime_context().get_node_id()[:12]
        except Exception:
            info["node"] = "?"
        try:
            from .backend import EmbeddedBackend, on_worker

            self.backend = EmbeddedBackend.boot(**on_worker(self.options))
        except Exception as e:  # reported by the driver, naming this worker
            info["error"] = f"{type(e).__name__}: {e}"
            return info
        info["comfyui"] = str(self.backend.comfy.comfy_path)
        info["version"] = self.backend.comfy.version
        info["types"] = sorted(self.backend.available_types())
        return info

    def object_info(self, node_types) -> dict:
        return _plain(self.backend.object_info(node_types))  # the driver may have no ComfyUI to unpickle its types

    def validate(self, prompt: dict) -> Optional[str]:
        return self.backend.validate(prompt)

    def run(self, prompt: dict, send_files: bool) -> tuple:
        """(RunResult, {file id: path on this worker}, {file id: bytes} when ``send_files``, seconds in ComfyUI)."""
        t0 = time.monotonic()
        result = self.backend.run(prompt)
        compute = time.monotonic() - t0
        result.ui_outputs, result.error = _plain(result.ui_outputs), _plain(result.error)
        paths = output_files(result.ui_outputs, self.backend.resolve_file, self.backend.resolve_lora)
        data = {}
        if send_files:
            for fid, path in paths.items():
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        data[fid] = f.read()
        return result, paths, data, compute


# -- the driver side -------------------------------------------------------------------------------------------------
def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A host:port (or ray://host:port) address must answer a TCP connection; 'auto' and 'local' need none."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--ray {address!r}: expected 'auto', 'local', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"--ray {address}: the Ray cluster is unreachable ({e.strerror or e}); start its head "
                           f"with `ray start --head --port {port}` on {host}, or check the address; nothing was "
                           f"run") from None


class RayBackend(Backend):
    def __init__(self, address: str = "auto", worker_options: Optional[dict] = None,
                 gpus_per_worker: Optional[float] = None, cpus_per_worker: float = 1.0, workers: Optional[int] = None,
                 max_retries: int = 2, shared_output: bool = False, boot_timeout: float = 600.0):
        ray = import_ray()
        check_reachable(address)
        try:
            if address == "local":
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except Exception as e:  # ConnectionError, TimeoutError (a port that answers but is no Ray head), ...
            raise ClusterError(f"--ray {address}: cannot connect to a Ray cluster there ({_short(e)}); is it the "
                               f"address `ray start --head` printed? nothing was run") from None
        self.ray, self.address = ray, address
        self.max_retries, self.shared_output = max(0, int(max_retries)), shared_output
        self.files_dir: Optional[Path] = None
        self.paths: dict[str, str] = {}
        #: per finished job: seconds the driver waited beyond the worker's time in ComfyUI (placement, sending the
        #: graph and the files, Ray's own bookkeeping)
        self.overheads: list[float] = []
        self.on_job_start: Optional[Callable[[Any, dict], None]] = None  # (job, worker info): a hook for tests
        try:
            self._start_workers(dict(worker_options or {}), gpus_per_worker, cpus_per_worker, workers, boot_timeout)
        except BaseException:
            self.close()
            raise

    def _start_workers(self, options: dict, gpus: Optional[float], cpus: float, count: Optional[int],
                       boot_timeout: float) -> None:
        ray = self.ray
        total = ray.cluster_resources()
        if gpus is None:
            gpus = 1.0 if total.get("GPU", 0) > 0 else 0.0
        if gpus == 0 and options.get("cpu") is None:  # the CLI passes cpu=None when --cpu is not given
            options["cpu"] = True
        if count is None:
            count = max(1, _worker_count(total, cpus, gpus))
        actor = ray.remote(ComfyWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0,
                                                scheduling_strategy="SPREAD")  # num_cpus=0: no CPU bound
        self.actors = [actor.remote(f"w{i + 1}", options) for i in range(count)]
        refs = [a.boot.remote() for a in self.actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=boot_timeout)
        if pending:
            raise ClusterError(f"--ray {self.address}: {len(pending)} of {count} worker(s) did not start within "
                               f"{boot_timeout:.0f} s: the cluster has {_resources(total)}, each worker asks for "
                               f"{cpus:g} CPU and {gpus:g} GPU (--ray-cpus-per-worker / --ray-gpus-per-worker, "
                               f"--ray-workers); nothing was run")
        infos = []
        for i, ref in enumerate(refs):
            try:
                infos.append(ray.get(ref))
            except Exception as e:
                raise ClusterError(f"worker w{i + 1}: could not start ({_cause(e)}); is comfyui-memora installed "
                                   f"on every machine of the cluster? nothing was run") from None
        problems = [f"worker {_who(i)}: {i['error']}" for i in infos if "error" in i]
        problems += [f"worker {_who(i)}: its ComfyUI ({i['comfyui']}) has no MemoRa nodes: the comfyui-memora pack "
                     f"is not installed there" for i in infos if "error" not in i
                     and not any(t.startswith("MemoRa") for t in i["types"])]
        if problems:
            raise ClusterError("the Ray cluster cannot run this batch; nothing was run:\n  - " + "\n  - ".join(problems))
        self.infos = infos
        self.alive = dict(zip((i["name"] for i in infos), self.actors))
        self._types = set.intersection(*(set(i["types"]) for i in infos))

    # -- planning: answered by the workers ---------------------------------------------------------------------------
    def describe(self) -> str:
        hosts = sorted({i["host"] for i in self.infos})
        return f"Ray cluster {self.address} ({len(self.infos)} worker(s) on {', '.join(hosts)})"

    def available_types(self) -> set:
        return set(self._types)

    def object_info(self, node_types) -> dict:
        """The first worker's definitions, with each list of options (model files, say) the union over the workers:
        a file one worker lacks is then named with that worker by :meth:`validate`, not refused for all."""
        infos = self.ray.get([a.object_info.remote(list(node_types)) for a in self.actors])
        merged = infos[0]
        for other in infos[1:]:
            for node_type, info in merged.items():
                for section in ("required", "optional"):
                    theirs = (other.get(node_type, {}).get("input") or {}).get(section) or {}
                    for name, spec in ((info.get("input") or {}).get(section) or {}).items():
                        _union_options(spec, theirs.get(name))
        return merged

    def validate(self, prompt: dict) -> Optional[str]:
        """Every worker's ComfyUI validates the graph (a model file missing on one machine shows here)."""
        answers = self.ray.get([a.validate.remote(prompt) for a in self.actors])
        bad = [f"worker {_who(i)}: {a}" for i, a in zip(self.infos, answers) if a]
        return "\n".join(bad) if bad else None

    def run(self, prompt: dict, timeout: Optional[float] = None) -> RunResult:
        out = []
        self.run_all([0], lambda _j: prompt, lambda j, r, s, t: out.append(r), timeout)
        return out[0]

    # -- files ---------------------------------------------------------------------------------------------------------
    def bind_results(self, results_dir: Path) -> None:
        self.files_dir = None if self.shared_output else Path(results_dir) / "files"

    def resolve_file(self, item: dict) -> str:
        return self.paths.get(file_id(item), file_id(item)[len("file:"):])

    def resolve_lora(self, name: str) -> str:
        return self.paths.get(f"lora:{name}", name)

    def _receive(self, job: Any, paths: dict, data: dict) -> None:
        """Write the files a worker sent for ``job`` under files/<job key>/ (their place in its output folder kept:
        machines number their outputs on their own, so two jobs' files may share a name) and note where each is. A
        different file already there (the same job's earlier try kept its bytes: equal, reused) is never replaced:
        the new one takes the next free name "<stem> (2).<ext>"."""
        from memora.fileio import atomic_write

        key = str(getattr(job, "key", None) or f"job-{len(self.overheads)}")
        for fid, path in paths.items():
            if self.files_dir is not None and fid in data:
                kind, _, rel = fid.partition(":")
                target = self.files_dir / key / ("loras" if kind == "lora" else "") / rel
                if not target.exists():
                    try:
                        target = atomic_write(target, data[fid])
                    except FileExistsError:
                        target = _numbered(target, data[fid])
                elif target.read_bytes() != data[fid]:
                    target = _numbered(target, data[fid])
                path = str(target)
            self.paths[fid] = path

    # -- running -------------------------------------------------------------------------------------------------------
    def run_all(self, jobs: list, prompt_of: Callable[[Any], dict], on_done: OnDone,
                job_timeout: Optional[float] = None, on_start: Optional[OnStart] = None) -> list:
        queue = _Placement(jobs, prompt_of)
        info = {i["name"]: i for i in self.infos}
        idle = [n for n in self.alive]
        flight: dict = {}  # ref -> (worker, job, t0, started)
        retries: dict[int, list] = {}
        try:
            while True:
                for name in [n for n in idle if n in self.alive]:
                    job = queue.take(name)
                    if job is None:
                        continue
                    idle.remove(name)
                    if self.on_job_start:
                        self.on_job_start(job, info[name])
                    if on_start:
                        on_start(job, name)
                    ref = self.alive[name].run.remote(queue.prompt(job), self.files_dir is not None)
                    flight[ref] = (name, job, time.monotonic(), now())
                if not flight:
                    break
                done, _ = self.ray.wait(list(flight), num_returns=1, timeout=1.0)
                for ref in done:
                    name, job, t0, started = flight.pop(ref)
                    try:
                        result, paths, data, compute = self.ray.get(ref)
                    except self.ray.exceptions.RayActorError as e:  # the worker died
                        self._lost(name, job, e, queue, retries, on_done, t0, started)
                        continue
                    except self.ray.exceptions.RayTaskError as e:  # raised on the worker, outside ComfyUI: a result
                        result = RunResult("", False, error={"exception_type": "WorkerError",
                                                             "exception_message": _cause(e)},
                                           server=f"ray:{name}@{info[name]['host']}",
                                           retries=retries.pop(id(job), []))
                        on_done(job, result, time.monotonic() - t0, started)
                        idle.append(name)
                        continue
                    except self.ray.exceptions.RayError as e:  # the result was lost (object lost): a lost try
                        self._lost(name, job, e, queue, retries, on_done, t0, started, drop=False)
                        idle.append(name)
                        continue
                    self._receive(job, paths, data)
                    self.overheads.append(time.monotonic() - t0 - compute)
                    result.server = f"ray:{name}@{info[name]['host']}"
                    result.retries = retries.pop(id(job), [])
                    on_done(job, result, time.monotonic() - t0, started)
                    idle.append(name)
        except KeyboardInterrupt:
            # Ray refuses force=True for actor tasks (ValueError); a plain cancel asks politely, and close() kills
            # the actors, so the user gets the runner's "interrupted; rerun to resume"
            for ref in flight:
                try:
                    self.ray.cancel(ref)
                except Exception:
                    pass
            raise
        left = queue.left()
        if left and not self.alive:
            raise AllWorkersFailed(f"every Ray worker died; {len(left)} job(s) not run (rerun the same command to "
                                   f"resume)")
        return left

    def _lost(self, name: str, job: Any, err: Exception, queue: "_Placement", retries: dict, on_done: OnDone,
              t0: float, started: str, drop: bool = True) -> None:
        """A worker died with ``job`` (``drop``: drop the worker; else only the job's result was lost): the job runs
        again, or is recorded as failed once it has lost ``max_retries`` + 1 tries."""
        who = _who(next(i for i in self.infos if i["name"] == name))
        if drop:
            self.alive.pop(name, None)
            queue.release(name)
        tries = retries.setdefault(id(job), [])
        tries.append({"worker": who, "error": _short(err)})
        what = "died" if drop else "lost its job's result"
        print(f"memora-batch: Ray worker {who} {what} ({_short(err)}); its job runs again", file=sys.stderr,
              flush=True)
        if len(tries) > self.max_retries:
            retries.pop(id(job))
            result = RunResult("", False, error={"exception_type": "WorkerLost", "exception_message":
                                                 f"the worker died {len(tries)} times running this job "
                                                 f"(--max-retries {self.max_retries})"},
                               server=f"ray:{name}", retries=tries)
            on_done(job, result, time.monotonic() - t0, started)
        else:
            queue.put_back(job)

    def close(self) -> None:
        ray = getattr(self, "ray", None)
        if ray is not None and ray.is_initialized():
            for actor in getattr(self, "actors", []):
                try:
                    ray.kill(actor)
                except Exception:
                    pass
            ray.shutdown()


class _Placement:
    """Jobs grouped by affinity key (in sweep order); each group belongs to the worker that started it."""

    def __init__(self, jobs: list, prompt_of: Callable[[Any], dict]):
        self._prompt_of = prompt_of
        self.prompts: dict[int, dict] = {}
        self.groups: "OrderedDict[str, deque]" = OrderedDict()
        self.group_of: dict[int, str] = {}
        for job in jobs:
            prompt = prompt_of(job)
            self.prompts[id(job)] = prompt
            key = affinity_key(prompt)
            self.groups.setdefault(key, deque()).append(job)
            self.group_of[id(job)] = key
        self.owner: dict[str, str] = {}

    def prompt(self, job: Any) -> dict:
        return self.prompts[id(job)]

    def take(self, worker: str) -> Any:
        live = [k for k, q in self.groups.items() if q]
        own = [k for k in live if self.owner.get(k) == worker]
        free = [k for k in live if k not in self.owner]
        if own or free:
            key = (own or free)[0]
            self.owner[key] = worker
            return self.groups[key].popleft()
        shared = max(live, key=lambda k: len(self.groups[k]), default=None)
        if shared is not None and len(self.groups[shared]) > 1:
            return self.groups[shared].pop()  # from the far end: the owner keeps the front
        return None

    def put_back(self, job: Any) -> None:
        self.groups[self.group_of[id(job)]].appendleft(job)

    def release(self, worker: str) -> None:
        for key in [k for k, w in self.owner.items() if w == worker]:
            del self.owner[key]

    def left(self) -> list:
        return [j for q in self.groups.values() for j in q]


def _numbered(target: Path, data: bytes) -> Path:
    """``data`` next to ``target`` under the first free name "<stem> (n)<suffix>", n >= 2 (never overwrites)."""
    from memora.fileio import write_numbered

    return write_numbered(target.parent, lambda n: f"{target.stem} ({n}){target.suffix}", 2, data)


def _worker_count(total: dict, cpus: float, gpus: float) -> int:
    """How many workers fit the cluster: each resource asked for bounds it (--ray-cpus-per-worker 0 drops the CPU
    bound, for GPU clusters); asking for neither gives one worker per CPU."""
    by = [int(total.get(res, 0) // per) for res, per in (("CPU", cpus), ("GPU", gpus)) if per > 0]
    return min(by) if by else int(total.get("CPU", 0))


def _union_options(spec: Any, other: Any) -> None:
    """Add ``other``'s options to the input spec ``spec`` (old style: [[options], {...}]; COMBO: ["COMBO",
    {"options": [...]}])."""
    if not (isinstance(spec, list) and isinstance(other, list) and spec and other):
        return
    if isinstance(spec[0], list) and isinstance(other[0], list):
        spec[0].extend(o for o in other[0] if o not in spec[0])
    elif len(spec) > 1 and len(other) > 1 and isinstance(spec[1], dict) and isinstance(other[1], dict) \
            and isinstance(spec[1].get("options"), list) and isinstance(other[1].get("options"), list):
        spec[1]["options"].extend(o for o in other[1]["options"] if o not in spec[1]["options"])


def _plain(value: Any) -> Any:
    """JSON's own types only (what /object_info and /history would serve)."""
    import json

    return json.loads(json.dumps(value, default=str))


def _who(info: dict) -> str:
    return f"{info['name']} (pid {info['pid']} on {info['host']}, Ray node {info.get('node', '?')})"


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _cause(err: BaseException) -> str:
    """The exception at the root of a Ray error (the last 'XxxError: ...' line of the traceback it carries, say
    "ModuleNotFoundError: No module named 'memora_batch'"), else its first line."""
    import re

    found = [line.strip() for line in str(err).splitlines() if re.match(r"\s*[\w.]+(Error|Exception): ", line)]
    return found[-1][:300] if found else _short(err)


def _resources(total: dict) -> str:
    return ", ".join(f"{total.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
