"""``--slurm``: the sweep as a SLURM job array through submitit, without Ray.

The driver (the ``memora-batch`` process, on the login node) plans with an embedded ComfyUI of its own (node
definitions and ComfyUI's validation; nothing runs there), splits the jobs into shards (jobs sharing upstream work,
:func:`~memora_batch.backend.affinity_key`, stay in one shard so its cache saves that work) and submits one array task
per shard. Each task boots the embedded backend on its node, runs its jobs and appends one line per finished job to
its own results shard, ``<results folder>/slurm/<run>/shard-<i>.jsonl`` (flushed and fsync'ed per job). The driver
follows the shards as they grow and merges each line into results.jsonl, the one table, as the job finishes. A shard
that dies leaves the lines of its finished jobs; the rest are reported as not run, and a rerun of the same command
first merges every shard line not yet in the table (also after a driver crash), then submits only what is left.
SLURM clusters share the file system between nodes: output files stay where the shard's ComfyUI wrote them."""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .backend import (Backend, EmbeddedBackend, MissingExtra, OnDone, OnStart, RunResult, affinity_key, file_id,
                      now, on_worker, output_files)
from .workflow import graph_key

SHARD_GLOB = "*/shard-*.jsonl"


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise MissingExtra("--slurm", "submitit", "slurm") from None
    return submitit


def run_shard(shard_file: str, items: list, options: dict) -> int:
    """One array task: boot the embedded ComfyUI, run ``items`` ([job id, prompt]) in order, one line per finished
    job in ``shard_file``; jobs already there (a resumed task) are skipped. Returns the number of jobs run."""
    from memora.fileio import atomic_write

    path = Path(shard_file)
    done = set(_read_lines(path))
    atomic_write(path.with_suffix(".json"), json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                        "task": os.environ.get("SLURM_ARRAY_TASK_ID")}), replace=True)
    backend = EmbeddedBackend.boot(**on_worker(options))
    name = f"slurm:{path.stem}@{socket.gethostname()}"
    ran = 0
    for job_id, prompt in items:
        if job_id in done:
            continue
        started, t0 = now(), time.monotonic()
        result = backend.run(prompt)
        line = {"id": job_id, "prompt_id": result.prompt_id, "success": result.success, "ui": result.ui_outputs,
                "error": result.error, "server": name, "started": started, "seconds": time.monotonic() - t0,
                "paths": output_files(result.ui_outputs, backend.resolve_file, backend.resolve_lora)}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        ran += 1
    return ran


def _read_lines(path: Path, offset: int = 0) -> dict:
    """{job id: line} of the complete lines of a shard file from ``offset`` (a torn last line is not complete)."""
    out = {}
    try:
        data = path.read_bytes()[offset:]
    except OSError:
        return out
    for raw in data[:data.rfind(b"\n") + 1].splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and "id" in line:
            out[line["id"]] = line
    return out


class SlurmBackend(Backend):
    def __init__(self, worker_options: dict, partition: Optional[str] = None, gpus: int = 1, time_min: int = 60,
                 shards: Optional[int] = None, executor: str = "slurm", poll: float = 0.5):
        self.submitit = import_submitit()
        self.options = dict(worker_options)
        self.local = EmbeddedBackend.boot(**on_worker(self.options))  # planning only: definitions, validation
        self.partition, self.gpus, self.time_min = partition, gpus, time_min
        self.shards, self.executor, self.poll = shards, executor, poll
        self.dir: Optional[Path] = None
        self.paths: dict[str, str] = {}

    def describe(self) -> str:
        where = "submitit's local executor" if self.executor == "local" else \
            f"SLURM{' partition ' + self.partition if self.partition else ''}"
        return f"{where} (job array; planned with {self.local.describe()})"

    def available_types(self) -> set:
        return self.local.available_types()

    def object_info(self, node_types) -> dict:
        return self.local.object_info(node_types)

    def validate(self, prompt: dict) -> Optional[str]:
        return self.local.validate(prompt)

    def run(self, prompt: dict, timeout: Optional[float] = None) -> RunResult:
        return self.local.run(prompt)

    def bind_results(self, results_dir: Path) -> None:
        self.dir = Path(results_dir) / "slurm"

    def resolve_file(self, item: dict) -> str:
        return self.paths.get(file_id(item)) or self.local.resolve_file(item)

    def resolve_lora(self, name: str) -> str:
        return self.paths.get(f"lora:{name}") or self.local.resolve_lora(name)

    def _deliver(self, job: Any, line: dict, on_done: OnDone) -> None:
        self.paths.update(line.get("paths") or {})
        result = RunResult(line.get("prompt_id") or "", bool(line.get("success")), line.get("ui") or {},
                           line.get("error"), line.get("server") or "slurm")
        on_done(job, result, float(line.get("seconds") or 0.0), line.get("started") or "")

    def run_all(self, jobs: list, prompt_of: Callable[[Any], dict], on_done: OnDone,
                job_timeout: Optional[float] = None, on_start: Optional[OnStart] = None) -> list:
        if self.dir is None:
            raise RuntimeError("SlurmBackend.run_all before bind_results: the shards need the results folder")
        by_id = {graph_key(prompt_of(j)): j for j in jobs}
        earlier = {}
        for f in sorted(self.dir.glob(SHARD_GLOB)):
            earlier.update({k: v for k, v in _read_lines(f).items() if v.get("success")})
        for job_id in [k for k in by_id if k in earlier]:  # finished by a shard, not yet in the table: merge
            self._deliver(by_id.pop(job_id), earlier[job_id], on_done)
        if not by_id:
            return []
        run_dir = self.dir / _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        run_dir.mkdir(parents=True, exist_ok=True)
        parts = self._shard(by_id, prompt_of)
        files = [str(run_dir / f"shard-{i}.jsonl") for i in range(len(parts))]
        tasks = self._submit(run_dir, files, parts)
        print(f"memora-batch: {len(parts)} shard(s) submitted ({', '.join(str(t.job_id) for t in tasks)}); "
              f"shard results in {run_dir}", file=sys.stderr, flush=True)
        try:
            return self._follow(tasks, files, by_id, on_done)
        except KeyboardInterrupt:  # Ctrl-C: the submitted shards are cancelled, not left running behind the user
            for t in tasks:
                try:
                    t.cancel(check=False)
                except Exception:
                    pass
            raise

    def _shard(self, by_id: dict, prompt_of: Callable[[Any], dict]) -> list:
        groups: dict[str, list] = {}
        for job_id, job in by_id.items():
            prompt = prompt_of(job)
            groups.setdefault(affinity_key(prompt), []).append([job_id, prompt])
        n = min(self.shards or min(len(groups), 32), len(by_id))
        parts: list[list] = [[] for _ in range(n)]
        for group in sorted(groups.values(), key=len, reverse=True):  # whole groups, largest first, to the lightest
            if len(groups) >= n:
                min(parts, key=len).extend(group)
            else:  # fewer groups than shards asked for: split groups too
                for item in group:
                    min(parts, key=len).append(item)
        return [p for p in parts if p]

    def _submit(self, run_dir: Path, files: list, parts: list) -> list:
        executor = self.submitit.AutoExecutor(folder=str(run_dir / "submitit"), cluster=self.executor)
        params = {"timeout_min": self.time_min, "name": "memora-batch"}
        if self.executor == "slurm":
            params.update(gpus_per_node=self.gpus, slurm_array_parallelism=len(parts))
            if self.partition:
                params["slurm_partition"] = self.partition
        executor.update_parameters(**params)
        return executor.map_array(run_shard, files, parts, [self.options] * len(parts))

    def _follow(self, tasks: list, files: list, by_id: dict, on_done: OnDone) -> list:
        offsets = [0] * len(files)
        while True:
            finished = all(t.done() for t in tasks)
            for i, f in enumerate(files):
                path = Path(f)
                size = path.stat().st_size if path.exists() else 0
                if size > offsets[i]:
                    data = path.read_bytes()[offsets[i]:]
                    complete = data.rfind(b"\n") + 1
                    for job_id, line in _read_lines(path, offsets[i]).items():
                        if job_id in by_id:
                            self._deliver(by_id.pop(job_id), line, on_done)
                    offsets[i] += complete
            if finished:
                break
            time.sleep(self.poll)
        for t in tasks:
            try:
                err = t.exception()
            except Exception as e:  # submitit could not read the task's outcome (killed before writing it)
                err = e
            if err is not None:
                lines = str(err).strip().splitlines() or [type(err).__name__]
                print(f"memora-batch: shard {t.job_id} ended without finishing: {lines[-1][:300]}; its unfinished "
                      f"jobs are left for a rerun (log: {t.paths.stderr})", file=sys.stderr, flush=True)
        return list(by_id.values())

    def close(self) -> None:
        pass
