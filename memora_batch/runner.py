"""The batch runner: a workflow x a sweep -> jobs -> run (embedded or on servers) -> results table.

Everything that can be checked is checked before the first job starts: the workflow's node types are installed
where it will run, every sweep column addresses an input, every value fits its input's type, the servers answer."""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import sweep as _sweep
from .results import ResultsStore, files_from_ui, metrics_from_ui, tables_from_ui
from .workflow import Workflow, apply_overrides, graph_key, object_info_in_process, quick_settings, title_of

#: Titles of the checkpoint loaders the example workflows use (``--original``/``--unlearned``/``--models``).
MODEL_TITLES = {"original": "Original model", "unlearned": "Unlearned model", "never_learned": "Never-learned model"}
MICRO_WORLD_NODE = "MemoRaLoadMicroWorld"
MICRO_DETECTOR_NODE = "MemoRaMicroDetector"


@dataclass
class Job:
    index: int
    row: Optional[int]
    overrides: dict
    labels: dict
    api: dict
    key: str
    titles: dict = field(default_factory=dict)


# -- backends --------------------------------------------------------------------------------------------------------
class EmbeddedBackend:
    """ComfyUI's executor in this process (no server). Node outputs stay cached between jobs, as in a server:
    jobs that differ only downstream (say, the evaluation seed) reuse the upstream work (inversion, training)."""

    def __init__(self, comfy):
        self.comfy = comfy
        self.where = f"the embedded ComfyUI ({comfy.comfy_path})"

    @classmethod
    def boot(cls, comfy_path: Optional[str] = None, base_directory: Optional[str] = None,
             custom_nodes: tuple = (), all_custom_nodes: bool = False, cpu: Optional[bool] = None) -> "EmbeddedBackend":
        from .embedded import EmbeddedComfy, find_comfyui

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

    def available_types(self) -> set:
        import nodes

        return set(nodes.NODE_CLASS_MAPPINGS)

    def object_info(self, node_types) -> dict:
        return object_info_in_process(node_types)

    def run(self, job: Job):
        from .embedded import GraphValidationError, RunResult

        try:
            return self.comfy.run(job.api)
        except GraphValidationError as e:
            return RunResult("", False, {}, [], {"exception_type": "GraphValidationError",
                                                 "exception_message": str(e)})

    def resolve_file(self, item: dict) -> str:
        import folder_paths

        base = folder_paths.get_directory_by_type(item.get("type", "output")) or folder_paths.get_output_directory()
        return str(Path(base, item.get("subfolder") or "", item["filename"]))

    def resolve_lora(self, name: str) -> str:
        import folder_paths

        return folder_paths.get_full_path("loras", name) or name

    def output_directory(self) -> str:
        import folder_paths

        return folder_paths.get_output_directory()


class ServerBackend:
    def __init__(self, urls: list[str], timeout: float = 10.0):
        from .server_client import check_servers

        self.servers = check_servers(urls, timeout=timeout)  # ServerUnreachable before anything runs
        self.where = "server " + ", ".join(s.url for s in self.servers)
        infos = [s.object_info() for s in self.servers]
        self._info = {k: v for k, v in infos[0].items() if all(k in i for i in infos)}

    def available_types(self) -> set:
        return set(self._info)

    def object_info(self, node_types) -> dict:
        return {t: self._info[t] for t in node_types if t in self._info}

    def resolve_file(self, item: dict) -> str:
        return self.servers[0].view_url(item) if len(self.servers) == 1 else \
            "/".join(p for p in (item.get("type", "output"), item.get("subfolder"), item["filename"]) if p)

    def resolve_lora(self, name: str) -> str:
        return name

    def output_directory(self) -> str:
        return "the server's output folder"


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


# -- preparing jobs --------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    workflow: Workflow
    object_info: dict
    base_api: dict
    jobs: list[Job]
    profile: Optional["ModelProfile"] = None


TITLE = object()  # placeholder in a swap's inputs: the swapped node's own title


@dataclass
class ModelProfile:
    """What ``--models`` / ``--original`` / ``--unlearned`` change: node swaps (title, or 'prefix*' -> class and
    inputs), input defaults applied where the workflow has them, texts for titled prompt nodes, and the metric the
    demo reports as the concept detector."""

    swaps: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    texts: dict = field(default_factory=dict)
    detector_metric: Optional[str] = None
    description: str = ""


def model_profile(models: Optional[str], original: Optional[str] = None, unlearned: Optional[str] = None,
                  never_learned: Optional[str] = None) -> ModelProfile:
    prof = ModelProfile()
    if models == "micro":
        prof = micro_world_profile()
    elif models not in (None, "", "checkpoints"):
        raise ValueError(f"--models {models!r}: expected 'micro' (the built-in micro world) or 'checkpoints'")
    for variant, ckpt in (("original", original), ("unlearned", unlearned), ("never_learned", never_learned)):
        if ckpt:
            prof.swaps[MODEL_TITLES[variant]] = ("CheckpointLoaderSimple", {"ckpt_name": ckpt})
    return prof


def model_swaps(models: Optional[str], original: Optional[str], unlearned: Optional[str],
                never_learned: Optional[str] = None) -> dict:
    """Title -> (class_type, inputs) replacing the titled checkpoint loaders."""
    return model_profile(models, original, unlearned, never_learned).swaps


#: micro-world demo: images per evaluation (the detector rate is a share of these)
MICRO_EVAL_IMAGES = 32


def micro_world_profile() -> ModelProfile:
    """The built-in micro world (memora.micro, weights shipped with the pack): its three models for the titled
    loaders, its concept detector for the nodes titled 'Concept score ...', its erased concept's caption for the
    concept and evaluation prompts, its image size for the titled size nodes."""
    from memora.micro import world

    manifest = world.load_manifest()  # a clear FileNotFoundError when the weights are absent
    concept = manifest.get("erased_concept", world.ERASED_CONCEPT)
    # Empty Latent Image divides by 8 (SD's VAE); the micro VAE is 4x, so its 8 x 8 latents come from 64 x 64
    size = int(manifest.get("empty_latent_size") or world.EMPTY_LATENT_SIZE)
    prof = ModelProfile(description=f"built-in micro world: tiny SD1.x-family models trained on procedural shapes, "
                                    f"shipped with the pack; concept {concept!r} erased ESD-style")
    for variant, title in MODEL_TITLES.items():
        prof.swaps[title] = (MICRO_WORLD_NODE, {"variant": variant})
    prof.swaps["Concept score*"] = (MICRO_DETECTOR_NODE, {"concept": concept, "title": TITLE})
    for title in ("Seed image size", "Evaluation image size"):
        prof.defaults[f"{title}.width"] = size
        prof.defaults[f"{title}.height"] = size
    prof.defaults["Evaluation image size.batch_size"] = MICRO_EVAL_IMAGES
    # The micro world's MemoRa settings as its own experiment uses them (scripts/micro_recovery.py, Settings):
    # 100 LoRA updates at learning rate 1e-2 (at 1e-3 the micro LoRA stays too small to change the images),
    # evaluation with DDIM 50 steps, seed 1.
    prof.defaults.update({"Train LoRA.steps": 100, "Train LoRA.learning_rate": 1e-2, "Evaluation seed.value": 1})
    for model in ("original", "unlearned", "recovered"):
        prof.defaults[f"Evaluate {model}.sampler_name"] = "ddim"
        prof.defaults[f"Evaluate {model}.scheduler"] = "ddim_uniform"
    prompt = world.erased_prompt(manifest)
    prof.texts = {"Concept prompt": prompt, "Evaluation prompt": prompt}
    prof.detector_metric = f"Concept score (recovered).{concept}.rate"
    return prof


def swap_nodes(api: dict, swaps: dict, object_info: dict) -> dict:
    """Replace the nodes with a given title by another class: ``{title: (class_type, inputs)}``. The new node gets
    its defaults, then the old node's inputs that it also has (links included), then ``inputs``. Output slots keep
    their positions (e.g. a checkpoint loader's MODEL, CLIP, VAE)."""
    import copy

    out = copy.deepcopy(api)
    for title, (class_type, inputs) in swaps.items():
        info = object_info.get(class_type, {})
        specs = {}
        for section in ("required", "optional"):
            specs.update((info.get("input") or {}).get(section) or {})
        defaults = {}
        for name, spec in ((info.get("input") or {}).get("required") or {}).items():
            if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
                defaults[name] = spec[1]["default"]
            elif isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], list) and spec[0]:
                defaults[name] = spec[0][0]
        match = (lambda t: t.startswith(title[:-1])) if title.endswith("*") else (lambda t: t == title)
        for nid in [n for n in out if match(title_of(out, n))]:
            node_title = title_of(out, nid)
            inputs = {k: (node_title if v is TITLE else v) for k, v in inputs.items()}
            kept = {k: v for k, v in out[nid].get("inputs", {}).items() if k in specs}
            out[nid] = {"class_type": class_type, "inputs": {**defaults, **kept, **inputs},
                        "_meta": {"title": node_title}}
    return out


def prefix_outputs(api: dict, prefix: str) -> dict:
    """Save nodes write under ``<prefix>/``: each job's files in their own folder of the output directory."""
    import copy

    out = copy.deepcopy(api)
    for node in out.values():
        v = node.get("inputs", {}).get("filename_prefix")
        if isinstance(v, str):
            node["inputs"]["filename_prefix"] = f"{prefix}/{v}"
    return out


def text_address(title: str, api: dict, object_info: dict, aliases: dict) -> str:
    """The text input of the node titled ``title`` (a string primitive's value, a text encoder's text, ...)."""
    from .workflow import AddressError, resolve_address

    for inp in TEXT_INPUTS:
        try:
            resolve_address(f"{title}.{inp}", api, object_info, aliases)
        except AddressError:
            continue
        return f"{title}.{inp}"
    raise AddressError(f"the workflow has no node titled {title!r} with a text input ({', '.join(TEXT_INPUTS)})")


TEXT_INPUTS = ("value", "text", "string", "prompt")


def plan_jobs(workflow: Workflow, backend, rows: Optional[list[dict]] = None, overrides: Optional[dict] = None,
              swaps: Optional[dict] = None, quick: bool = False, texts: Optional[dict] = None,
              defaults: Optional[dict] = None, soft_texts: Optional[dict] = None) -> Plan:
    """Every check, then the resolved graph of each job. Raises (before anything runs) on: node types not installed,
    sweep columns or --set keys that address nothing, values that do not fit their inputs.

    Order of precedence, lowest first: the workflow's values, ``swaps``, ``defaults`` and ``soft_texts`` (applied
    only where the workflow has such an input), ``quick``, ``texts`` and ``overrides`` (every job), sweep rows."""
    swaps = swaps or {}
    available = backend.available_types()
    for class_type, _ in swaps.values():
        if class_type not in available:
            raise _missing_swap(class_type, backend.where)
    workflow.check_installed(available, backend.where)
    types = set(workflow.required_node_types()) | {c for c, _ in swaps.values()}
    if workflow.api is None:
        # conversion needs the definitions of the nodes the UI graph references (incl. primitives' targets)
        types |= {n.get("type") for n in (workflow.ui or {}).get("nodes", []) if isinstance(n, dict)}
    object_info = backend.object_info(sorted(t for t in types if isinstance(t, str)))
    base = workflow.to_api(object_info)
    if swaps:
        base = swap_nodes(base, swaps, object_info)
    for address, value in (defaults or {}).items():  # profile settings, where the workflow has such an input
        try:
            base = apply_overrides(base, {address: value}, object_info, workflow.aliases)
        except ValueError:
            continue
    for title, text in (soft_texts or {}).items():  # likewise, where the titled text node exists
        try:
            base = apply_overrides(base, {text_address(title, base, object_info, workflow.aliases): text},
                                   object_info, workflow.aliases)
        except ValueError:
            continue
    if quick:
        base = quick_settings(base, object_info)
    global_overrides = dict(overrides or {})
    for title, text in (texts or {}).items():
        global_overrides.setdefault(text_address(title, base, object_info, workflow.aliases), text)
    base = apply_overrides(base, global_overrides, object_info, workflow.aliases)

    rows = rows if rows else [{}]
    columns = list(dict.fromkeys(c for r in rows for c in r))
    plan = _sweep.plan_columns(columns, base, object_info, workflow.aliases) if columns else {}
    jobs = []
    problems = []
    for i, row in enumerate(rows):
        ov, labels = _sweep.row_overrides(row, plan)
        try:
            api = apply_overrides(base, ov, object_info, workflow.aliases)
        except ValueError as e:
            problems.append(f"row {i + 1}: {e}")
            continue
        key = graph_key(api)
        titles = {nid: title_of(api, nid) for nid in api}
        typed = {addr: _value_at(api, addr, object_info, workflow.aliases) for addr in {**global_overrides, **ov}}
        jobs.append(Job(i, i if rows != [{}] else None, typed, labels, api, key, titles))
    if problems:
        raise _sweep.SweepError("the sweep has values that do not fit their inputs:\n  " + "\n  ".join(problems))
    return Plan(workflow, object_info, base, jobs)


def _value_at(api: dict, address: str, object_info: dict, aliases: dict):
    """The value an address holds in a resolved graph (typed as the input expects)."""
    from .workflow import resolve_address

    t = resolve_address(address, api, object_info, aliases)[0]
    return api[t.node_id]["inputs"].get(t.input)


def _missing_swap(class_type: str, where: str) -> Exception:
    from .workflow import MissingNodeTypes

    return MissingNodeTypes({class_type: ["(model swap)"]}, where)


# -- running ---------------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    total: int
    skipped: int
    ok: int = 0
    failed: int = 0
    not_run: int = 0
    records: list = field(default_factory=list)


class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="job", desc="memora-batch", file=sys.stderr,
                                dynamic_ncols=True)
            except ImportError:
                self.bar = None
        self.total, self.done = total, initial
        self.enabled = enabled

    def update(self, record: dict):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{record['key'][:8]} {record['status']}")
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {record['key']} {record['status']} {record.get('error') or ''}",
                  file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_plan(plan: Plan, backend, results_dir: "str | Path", retry_failed: bool = True, progress: bool = True,
             output_prefix: Optional[str] = None, job_timeout: Optional[float] = None,
             on_record: Optional[Callable[[dict], None]] = None) -> Summary:
    """Run the plan's unfinished jobs, appending one record per finished job. Ctrl-C stops after the records of the
    jobs already finished are safely written (KeyboardInterrupt propagates)."""
    store = ResultsStore(results_dir)
    finished = store.finished_keys()
    failed_before = {r["key"] for r in store.records if r.get("status") != "ok"}
    todo, seen = [], set()
    for job in plan.jobs:
        if job.key in finished or job.key in seen or (not retry_failed and job.key in failed_before):
            continue
        seen.add(job.key)
        todo.append(job)
    summary = Summary(total=len(plan.jobs), skipped=len(plan.jobs) - len(todo))
    prefix = output_prefix if output_prefix is not None else f"memora-batch/{plan.workflow.name}"

    def prompt_of(job: Job) -> dict:
        return prefix_outputs(job.api, f"{prefix}/{job.key}") if prefix else job.api

    bar = _Progress(len(plan.jobs), summary.skipped, progress)

    def record_of(job: Job, result, seconds: float, started: str) -> dict:
        files, loras = files_from_ui(result.ui_outputs, backend.resolve_file)
        rec = {
            "key": job.key,
            "status": "ok" if result.success else "error",
            "row": job.row,
            "workflow": plan.workflow.name,
            "overrides": job.overrides,
            "labels": job.labels,
            "outputs": {"files": files, "loras": loras,
                        "lora_paths": [backend.resolve_lora(n) for n in loras]},
            "metrics": metrics_from_ui(result.ui_outputs, job.titles),
            "tables": tables_from_ui(result.ui_outputs, job.titles),
            "started": started,
            "seconds": round(seconds, 3),
            "server": getattr(result, "server", "") or "embedded",
            "prompt_id": result.prompt_id,
            "error": result.error_message if not result.success else None,
        }
        if not result.success and result.error:
            rec["error_node"] = {k: result.error.get(k) for k in ("node_id", "node_type") if result.error.get(k)}
        return rec

    def done(job: Job, result, seconds: float, started: Optional[str] = None):
        rec = record_of(job, result, seconds, started or _now())
        store.append(rec)
        summary.records.append(rec)
        if rec["status"] == "ok":
            summary.ok += 1
        else:
            summary.failed += 1
        bar.update(rec)
        if on_record:
            on_record(rec)

    try:
        if isinstance(backend, ServerBackend):
            from .server_client import run_jobs

            starts = {}

            def prompt_with_start(job):
                starts[job.index] = _now()
                return prompt_of(job)

            def failed_server(server, job, err):
                print(f"memora-batch: server {server.url} failed ({err}); its job goes to another server",
                      file=sys.stderr, flush=True)

            left = run_jobs(backend.servers, todo, prompt_with_start,
                            lambda j, r, s: done(j, r, s, starts.get(j.index)), job_timeout=job_timeout,
                            on_server_failed=failed_server)
            summary.not_run = len(left)
        else:
            for job in todo:
                started, t0 = _now(), time.monotonic()
                job_api = prompt_of(job)
                result = backend.run(Job(job.index, job.row, job.overrides, job.labels, job_api, job.key, job.titles))
                done(job, result, time.monotonic() - t0, started)
    finally:
        bar.close()
    return summary


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def default_results_dir(workflow_name: str) -> Path:
    return Path(os.environ.get("MEMORA_BATCH_RESULTS", "memora-output")) / workflow_name
