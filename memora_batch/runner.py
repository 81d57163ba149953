"""The batch runner: a workflow x a sweep -> jobs -> run on a backend (embedded or servers) -> results table.

Everything that can be checked is checked before the first job starts: the workflow's node types are installed
where it will run; every title and input that ``--models``/``--original``/``--unlearned``/``--concept``/``--set``
and the sweep address exists; every value fits its input's type, range and options (integers exact, floats finite);
every distinct job graph is sound (:func:`~memora_batch.workflow.graph_problems`, then the backend's own validation:
ComfyUI's ``validate_prompt`` when embedded); the servers answer. Whatever does not match is listed in one error
(:class:`PlanError`) and nothing runs. :func:`run_plan` then checks that no job saves outside the output folder and
takes the results folder (:mod:`memora_batch.folder`: lock, writable, nothing foreign overwritten), still before the
first job."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from memora.contracts import TITLE_EVALUATION_PROMPT, TITLE_EVALUATION_SEED

from . import sweep as _sweep
from .backend import Backend, RunResult
from .folder import ResultsFolder
from .profiles import ModelProfile, Setting, apply_profile, load_reports, text_address
from .results import ResultsStore, files_from_ui, metrics_from_ui, tables_from_ui
from .workflow import (AddressError, MissingNodeTypes, Workflow, apply_overrides, graph_key, graph_problems,
                       quick_settings, resolve_address, title_of)


class PlanError(ValueError):
    """Settings that do not match the workflow (titles, inputs, values); raised before any job runs."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"nothing was run: {len(problems)} setting(s) do not match the workflow:\n  - "
                         + "\n  - ".join(p.replace("\n", "\n    ") for p in problems))


@dataclass
class Job:
    index: int
    row: Optional[int]
    overrides: dict
    labels: dict
    api: dict
    key: str
    titles: dict = field(default_factory=dict)


@dataclass
class Plan:
    workflow: Workflow
    object_info: dict
    jobs: list[Job]
    profile: Optional[ModelProfile] = None
    #: what every job gets before its sweep row (--models, --quick, --concept, --set), in the order applied
    settings: list[Setting] = field(default_factory=list)


# -- preparing jobs --------------------------------------------------------------------------------------------------
def _definitions(workflow: Workflow, backend: Backend, profile: ModelProfile) -> dict:
    """/object_info of every node type the workflow and the profile's swaps use; MissingNodeTypes first."""
    available = backend.available_types()
    for class_type, _ in profile.swaps.values():
        if class_type not in available:
            raise MissingNodeTypes({class_type: ["(model swap)"]}, backend.describe())
    workflow.check_installed(available, backend.describe())
    types = set(workflow.required_node_types()) | {c for c, _ in profile.swaps.values()}
    if workflow.api is None:
        # conversion needs the definitions of the nodes the UI graph references (incl. primitives' targets)
        types |= {n.get("type") for n in (workflow.ui or {}).get("nodes", []) if isinstance(n, dict)}
    return backend.object_info(sorted(t for t in types if isinstance(t, str)))


def _changes(before: dict, after: dict, source: str) -> list[Setting]:
    """The inputs ``after`` sets differently from ``before`` (what --quick changed), as settings."""
    return [Setting(f"{title_of(after, nid)}.{name}", value, source)
            for nid, node in after.items() for name, value in node.get("inputs", {}).items()
            if before.get(nid, {}).get("inputs", {}).get(name) != value]


def _global_settings(base: dict, object_info: dict, aliases: dict, overrides: dict, texts: dict,
                     problems: list) -> tuple[dict, list[Setting]]:
    """--concept / --eval-prompt texts, then --set (which wins where both address the same input)."""
    wanted: dict[str, tuple[Any, str]] = {}
    for title, text in texts.items():
        try:
            wanted[text_address(title, base, object_info, aliases)] = (text, "--concept / --eval-prompt")
        except AddressError as e:
            problems.append(f"--concept / --eval-prompt: {e}")
    for address, value in overrides.items():
        wanted[address] = (value, "--set")
    settings = []
    for address, (value, source) in wanted.items():
        try:
            base = apply_overrides(base, {address: value}, object_info, aliases)
        except AddressError as e:
            problems.append(f"{source}: {e}")
            continue
        settings.append(Setting(address, _value_at(base, address, object_info, aliases), source))
    return base, settings


def plan_jobs(workflow: Workflow, backend: Backend, rows: Optional[list[dict]] = None,
              overrides: Optional[dict] = None, profile: Optional[ModelProfile] = None, quick: bool = False,
              texts: Optional[dict] = None) -> Plan:
    """Every check, then the resolved graph of each job. Raises before anything runs: MissingNodeTypes (node types
    not installed), PlanError listing every title, input and value of the profile, --concept, --set and the sweep
    that does not match the workflow.

    Order of precedence, lowest first: the workflow's values, ``profile`` (swaps, input defaults, texts),
    ``quick``, ``texts`` (--concept) and ``overrides`` (--set; every job), sweep rows."""
    profile = profile or ModelProfile()
    object_info = _definitions(workflow, backend, profile)
    api = workflow.to_api(object_info)
    aliases = workflow.aliases  # set by the conversion (front-end Primitive nodes)
    base, settings, problems = apply_profile(api, profile, object_info, aliases)
    if quick:
        quick_api = quick_settings(base, object_info)
        settings += _changes(base, quick_api, "--quick")
        base = quick_api
    base, global_settings = _global_settings(base, object_info, aliases, dict(overrides or {}), dict(texts or {}),
                                             problems)
    settings += global_settings

    rows = rows if rows else [{}]
    columns = list(dict.fromkeys(c for r in rows for c in r))
    try:
        plan = _sweep.plan_columns(columns, base, object_info, aliases) if columns else {}
    except _sweep.SweepError as e:
        problems.append(str(e))
        plan = None
    jobs = []
    for i, row in enumerate(rows if plan is not None else []):
        ov, labels = _sweep.row_overrides(row, plan)
        try:
            api = apply_overrides(base, ov, object_info, aliases)
        except ValueError as e:
            problems.append(f"sweep row {i + 1}: {e}")
            continue
        typed = {s.address: s.value for s in global_settings}
        typed.update({addr: _value_at(api, addr, object_info, aliases) for addr in ov})
        jobs.append(Job(i, i if rows != [{}] else None, typed, labels, api, graph_key(api),
                        {nid: title_of(api, nid) for nid in api}))
    problems += _graph_checks(jobs, backend, object_info, rows != [{}]) if not problems else []
    if problems:
        raise PlanError(problems)
    return Plan(workflow, object_info, jobs, profile, settings)


def _graph_checks(jobs: list[Job], backend: Backend, object_info: dict, sweep: bool) -> list[str]:
    """Each distinct job graph checked as ComfyUI would check it (structure, required inputs, every value's type,
    range and options), then by the backend's own validation: a broken workflow stops the run before any job."""
    found: dict[str, list[str]] = {}
    checked = set()
    for job in jobs:
        if job.key in checked:
            continue
        checked.add(job.key)
        where = f"sweep row {job.index + 1}" if sweep else "the workflow"
        issues = graph_problems(job.api, object_info)
        if not issues:
            refused = backend.validate(job.api)
            issues = [refused] if refused else []
        for issue in issues:
            found.setdefault(issue, []).append(where)
    return [f"{_rows(wheres)}: {issue}" for issue, wheres in found.items()]


def _rows(wheres: list[str]) -> str:
    if len(wheres) == 1:
        return wheres[0]
    return f"{wheres[0]} (and {len(wheres) - 1} other row(s))"


def _value_at(api: dict, address: str, object_info: dict, aliases: dict):
    """The value an address holds in a resolved graph (typed as the input expects)."""
    t = resolve_address(address, api, object_info, aliases)[0]
    return api[t.node_id]["inputs"].get(t.input)


# -- running ---------------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    total: int
    skipped: int
    ok: int = 0
    failed: int = 0
    not_run: int = 0
    #: per worker (the record's ``server``): [jobs finished, seconds spent in them]
    workers: dict = field(default_factory=dict)
    #: jobs re-run after their worker died
    retried: int = 0

    def count(self, record: dict) -> None:
        if record["status"] == "ok":
            self.ok += 1
        else:
            self.failed += 1
        self.retried += bool(record.get("retries"))
        jobs_seconds = self.workers.setdefault(str(record.get("server")), [0, 0.0])
        jobs_seconds[0] += 1
        jobs_seconds[1] += float(record.get("seconds") or 0.0)

    def per_worker(self) -> str:
        """'w1: 3 jobs in 41.2 s; w2: ...' (empty when nothing ran)."""
        return "; ".join(f"{w}: {n} job{'s' if n != 1 else ''} in {t:.1f} s" for w, (n, t) in self.workers.items())


#: ComfyUI's own output during an embedded run, in the results folder
LOG_NAME = "comfyui.log"
#: node types whose run is a stage of its own on the console (with every MemoRa node)
STAGE_TYPES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")


class _Progress:
    """The console of a run. With node events (``nodes``: the embedded backend): one bar per job (its nodes done,
    the node running now) and a line per stage (a run of sampler or MemoRa nodes of one type, with its time).
    Without (servers, Ray, SLURM): one bar over the jobs, the jobs each worker finished in its postfix
    (``w1:3 w2:2``). Always a line per finished job (with its retries, and the jobs finished per worker when several
    workers run). Without tqdm, or with ``enabled`` False (--no-progress), the lines only. Writes to the stderr of
    its creation (ComfyUI's own output may be redirected to a log meanwhile)."""

    def __init__(self, total: int, initial: int, enabled: bool, nodes: bool = True):
        self.out = sys.stderr
        self.total, self.done, self.enabled, self.nodes = total, initial, enabled, nodes
        self.running: dict[str, str] = {}  # job key -> worker, without node events
        self.bar = None
        self.job: Optional[Job] = None
        self.stage: Optional[tuple[str, list, float]] = None  # (class type, titles, start)
        self.seen: set = set()
        self.per_worker: dict[str, int] = {}  # jobs finished per worker (the record's ``server``)

    def _write(self, text: str):
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def _tqdm(self, **kw):
        if not self.enabled:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(file=self.out, dynamic_ncols=True, leave=True, **kw)

    def start(self, job: Job, worker: Optional[str] = None):
        if not self.nodes:
            self.running[job.key] = worker or "?"
            if self.bar is None:
                self.bar = self._tqdm(total=self.total, initial=self.done, unit="job", desc="jobs")
            self._postfix()
            return
        if self.job is not None:
            return
        self.job, self.stage, self.seen = job, None, set()
        self.bar = self._tqdm(total=len(job.api), unit="node", desc=f"job {self.done + 1}/{self.total} {job.key[:8]}")

    def _postfix(self):
        """The job-level bar's postfix: jobs finished per worker, and how many run now."""
        if self.bar is None:
            return
        short = {w: w.split("@")[0].removeprefix("ray:") for w in self.per_worker}
        text = " ".join(f"{short[w]}:{n}" for w, n in self.per_worker.items())
        if self.running:
            text += f" (running {len(self.running)})"
        self.bar.set_postfix_str(text.strip())

    def event(self, event: str, data: Any):
        if self.job is None or not isinstance(data, dict):
            return
        nodes = data.get("nodes") if event == "execution_cached" else [data.get("node")] \
            if event == "executing" else []
        for nid in [str(n) for n in nodes or [] if n is not None]:
            if nid in self.seen or nid not in self.job.api:
                continue
            self.seen.add(nid)
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix_str(self.job.titles.get(nid, nid)[:40])
            if event == "executing":
                self._stage(nid)

    def _stage(self, nid: str):
        kind = self.job.api[nid].get("class_type", "")
        if not (kind.startswith("MemoRa") or kind in STAGE_TYPES):
            return
        if self.stage is not None and self.stage[0] == kind:
            self.stage[1].append(self.job.titles.get(nid, nid))
            return
        self._end_stage()
        self.stage = (kind, [self.job.titles.get(nid, nid)], time.monotonic())

    def _end_stage(self):
        if self.stage is None:
            return
        kind, titles, t0 = self.stage
        names = ", ".join(titles) if len(titles) <= 3 else f"{titles[0]} ... {titles[-1]}"
        self._write(f"  {self.job.key[:8]}  {kind}{f' x{len(titles)}' if len(titles) > 1 else ''}: {names}  "
                    f"({time.monotonic() - t0:.1f} s)")
        self.stage = None

    def update(self, record: dict):
        self.done += 1
        worker = str(record.get("server"))
        self.per_worker[worker] = self.per_worker.get(worker, 0) + 1
        if not self.nodes:
            self.running.pop(record["key"], None)
            if self.bar is None:
                self.bar = self._tqdm(total=self.total, initial=self.done - 1, unit="job", desc="jobs")
            if self.bar is not None:
                self.bar.update(1)
                self._postfix()
        mine = self.job is not None and self.job.key == record["key"]
        if mine:
            self._end_stage()
        if mine and self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.set_postfix_str(record["status"])
            self.bar.close()
            self.bar = None
        error = f" {record.get('error').splitlines()[0][:200]}" if record.get("error") else ""
        retried = f" (re-run {len(record['retries'])}x after a worker died)" if record.get("retries") else ""
        workers = (" [" + " ".join(f"{w}:{n}" for w, n in self.per_worker.items()) + "]"
                   if len(self.per_worker) > 1 else "")
        print(f"[{self.done}/{self.total}] job {record['key']} {record['status']} in {record.get('seconds')} s"
              f"{retried}{error}{workers}", file=self.out, flush=True)
        if mine:
            self.job = None

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class NodeClock:
    """Seconds each node of the running job took, from the executor's 'executing' events (a node runs from its event
    to the next one; a cached node sends none and costs nothing here). Read and reset by :meth:`take` when the job
    ends: a record's ``node_seconds`` ({node title: seconds}) and ``cached_nodes`` (titles of the nodes an earlier
    job computed), where the backend sends node events (embedded runs)."""

    def __init__(self):
        self.current: Optional[str] = None
        self.since = 0.0
        self.seconds: dict[str, float] = {}
        self.cached: set[str] = set()

    def _stop(self, now: float) -> None:
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
        self.current = None

    def event(self, event: str, data: Any) -> None:
        now = time.monotonic()
        if event == "executing":
            self._stop(now)
            node = data.get("node") if isinstance(data, dict) else None
            self.current, self.since = (str(node) if node is not None else None), now
        elif event == "execution_cached" and isinstance(data, dict):
            self.cached.update(str(n) for n in data.get("nodes") or [])
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            self._stop(now)

    def take(self) -> tuple[dict[str, float], set[str]]:
        """({node id: seconds}, the ids of the nodes whose outputs came from the cache) of the job that ended."""
        self._stop(time.monotonic())
        out, cached, self.seconds, self.cached = self.seconds, self.cached, {}, set()
        return out, cached


@contextlib.contextmanager
def comfyui_log(backend: Backend, results_dir: "str | Path"):
    """Embedded runs: while the block runs, ComfyUI's own output (its logging, prints and per-sampling progress
    bars) goes to ``<results>/comfyui.log`` instead of the console; yields that path (None for backends without
    it, e.g. servers, whose output stays in their own console: :meth:`Backend.log_to`)."""
    path = backend.log_to(Path(results_dir) / LOG_NAME)
    try:
        yield path
    finally:
        if path is not None:
            backend.log_to(None)


def run_plan(plan: Plan, backend: Backend, results_dir: "str | Path", retry_failed: bool = True,
             progress: bool = True, output_prefix: Optional[str] = None, job_timeout: Optional[float] = None,
             on_record: Optional[Callable[[dict], None]] = None, folder: Optional[ResultsFolder] = None) -> Summary:
    """Run the plan's unfinished jobs on ``backend``, appending one record per finished job. Ctrl-C stops after the
    records of the jobs already finished are safely written (KeyboardInterrupt propagates).

    Before the first job: every job's saved files must stay inside the output folder (PlanError), and the results
    folder is locked and checked (:mod:`memora_batch.folder`; ``folder``: a lock the caller already holds, else one
    is taken for the run)."""
    prefix = checked_output_prefix(plan, output_prefix)
    if folder is None:
        with ResultsFolder(results_dir):
            return _run_locked(plan, backend, results_dir, retry_failed, progress, prefix, job_timeout, on_record)
    return _run_locked(plan, backend, results_dir, retry_failed, progress, prefix, job_timeout, on_record)


def _run_locked(plan: Plan, backend: Backend, results_dir: "str | Path", retry_failed: bool, progress: bool,
                prefix: str, job_timeout: Optional[float], on_record: Optional[Callable[[dict], None]]) -> Summary:
    store = ResultsStore(results_dir)
    for problem in store.problems:
        print(f"memora-batch: warning: {problem}", file=sys.stderr, flush=True)
    store.repair()
    backend.bind_results(Path(results_dir))
    finished = store.finished_keys()
    failed_before = {r["key"] for r in store.records if r.get("status") != "ok"}
    todo, seen = [], set()
    for job in plan.jobs:
        if job.key in finished or job.key in seen or (not retry_failed and job.key in failed_before):
            continue
        seen.add(job.key)
        todo.append(job)
    summary = Summary(total=len(plan.jobs), skipped=len(plan.jobs) - len(todo))

    bar = _Progress(len(plan.jobs), summary.skipped, progress, nodes=backend.node_events)
    clock = NodeClock()

    def prompt_of(job: Job) -> dict:
        return prefix_outputs(job.api, f"{prefix}/{job.key}") if prefix else job.api

    def done(job: Job, result: RunResult, seconds: float, started: str):
        rec = _record(plan, job, result, backend, seconds, started)
        if backend.node_events:
            by_title: dict[str, float] = {}
            seconds, cached = clock.take()
            for nid, t in seconds.items():  # nodes sharing a title: their sum
                title = job.titles.get(nid, nid)
                by_title[title] = by_title.get(title, 0.0) + t
            rec["node_seconds"] = {t: round(v, 3) for t, v in by_title.items()}
            rec["cached_nodes"] = sorted({job.titles.get(nid, nid) for nid in cached})
        store.append(rec)
        summary.count(rec)
        bar.update(rec)
        if on_record:
            on_record(rec)

    if backend.node_events:
        def listener(event: str, data: Any):
            clock.event(event, data)
            bar.event(event, data)
        backend.listen(listener)
    try:
        summary.not_run = len(backend.run_all(todo, prompt_of, done, job_timeout=job_timeout, on_start=bar.start))
    finally:
        if backend.node_events:
            backend.listen(None)
        bar.close()
    return summary


def _record(plan: Plan, job: Job, result: RunResult, backend: Backend, seconds: float, started: str) -> dict:
    """One job's line in results.jsonl."""
    files, loras = files_from_ui(result.ui_outputs, backend.resolve_file)
    by_node = {}
    for nid, ui in (result.ui_outputs or {}).items():
        node_files = files_from_ui({nid: ui}, backend.resolve_file)[0]
        if node_files:
            by_node.setdefault(job.titles.get(str(nid), str(nid)), []).extend(node_files)
    rec = {
        "key": job.key,
        "status": "ok" if result.success else "error",
        "row": job.row,
        "workflow": plan.workflow.name,
        "overrides": job.overrides,
        "labels": job.labels,
        "outputs": {"files": files, "loras": loras, "lora_paths": [backend.resolve_lora(n) for n in loras],
                    "files_by_node": by_node},
        "evaluation": evaluation_settings(job.api),
        "metrics": metrics_from_ui(result.ui_outputs, job.titles),
        "tables": tables_from_ui(result.ui_outputs, job.titles),
        "load_reports": load_reports(result.ui_outputs, job.api),
        "started": started,
        "seconds": round(seconds, 3),
        "server": result.server,
        "prompt_id": result.prompt_id,
        "error": result.error_message if not result.success else None,
        "retries": list(result.retries),
    }
    if not result.success and result.error:
        rec["error_node"] = {k: result.error.get(k) for k in ("node_id", "node_type") if result.error.get(k)}
    return rec


def evaluation_settings(api: dict) -> dict:
    """The evaluation prompt and seed the job ran with (the inputs of the nodes titled 'Evaluation prompt' and
    'Evaluation seed', where the workflow has them): the captions of the report's comparison grids."""
    found = {}
    for key, title, names in (("prompt", TITLE_EVALUATION_PROMPT, ("value", "text", "string", "prompt")),
                              ("seed", TITLE_EVALUATION_SEED, ("value", "seed", "noise_seed"))):
        for nid in api:
            inputs = api[nid].get("inputs", {}) if title_of(api, nid) == title else {}
            value = next((inputs[n] for n in names if n in inputs and not isinstance(inputs[n], list)), None)
            if value is not None:
                found[key] = value
                break
    return found


def prefix_outputs(api: dict, prefix: str) -> dict:
    """Save nodes write under ``<prefix>/``: each job's files in their own folder of the output directory."""
    import copy

    out = copy.deepcopy(api)
    for node in out.values():
        v = node.get("inputs", {}).get("filename_prefix")
        if isinstance(v, str):
            node["inputs"]["filename_prefix"] = f"{prefix}/{v}"
    return out


class OutputPrefix(str):
    """An output prefix :func:`checked_output_prefix` has checked against ``plan``."""

    plan: Optional[Plan] = None


def checked_output_prefix(plan: Plan, given: Optional[str]) -> OutputPrefix:
    """``given`` (``--output-prefix``; None: ``memora-batch/<workflow name>``) checked once for ``plan`` by
    :func:`check_output_prefixes`; a prefix this returned for the same plan is not checked again."""
    if isinstance(given, OutputPrefix) and given.plan is plan:
        return given
    prefix = OutputPrefix(given if given is not None else f"memora-batch/{plan.workflow.name}")
    check_output_prefixes(plan, prefix)
    prefix.plan = plan
    return prefix


def check_output_prefixes(plan: Plan, prefix: str) -> None:
    """PlanError (before anything runs) if a job would save outside ComfyUI's output folder: an absolute
    ``filename_prefix`` or one that climbs out with '..' (``--output-prefix`` or the workflow's own)."""
    problems = []
    for job in plan.jobs:
        api = prefix_outputs(job.api, f"{prefix}/{job.key}") if prefix else job.api
        for nid, node in api.items():
            value = node.get("inputs", {}).get("filename_prefix")
            if isinstance(value, str) and _escapes(value):
                source = "--output-prefix" if prefix and _escapes(f"{prefix}/x") else "the workflow"
                problems.append(f"node {nid} ({title_of(api, nid)!r}): filename_prefix {value!r} (from {source}) "
                                f"saves outside ComfyUI's output folder; give a relative folder without '..'")
        if problems:
            break
    if problems:
        raise PlanError(list(dict.fromkeys(problems)))


def _escapes(prefix: str) -> bool:
    p = prefix.replace("\\", "/")
    if p.startswith("/") or (len(p) > 1 and p[1] == ":") or os.path.isabs(prefix):
        return True
    return os.path.normpath(p).replace("\\", "/").split("/")[0] == ".."


def default_results_dir(workflow_name: str) -> Path:
    return Path(os.environ.get("MEMORA_BATCH_RESULTS", "memora-output")) / workflow_name
