"""``memora-batch``: run saved ComfyUI workflows (UI or API format) over a sweep, embedded or on ComfyUI servers.

    memora-batch run WORKFLOW.json [--sweep rows.csv|.json|.yaml] [--set "Train LoRA.steps=100"] [--server URL]...
    memora-batch curve WORKFLOW.json --steps 10,50,100,250,500        (recovery curve + short/long-term verdict)
    memora-batch demo                                                  (memora_recovery on the built-in micro world)
    memora-batch demo --original sd-v1-4.ckpt --unlearned esd-nudity.safetensors --concept "a photo of the nude person"
    memora-batch convert WORKFLOW.json [-o api.json]                   (UI -> API format)
    memora-batch rescore RESULTS_DIR --convention erasediff            (rates again under another convention)
    memora-batch scoreboard --models micro --control never_learned     (every recovery attack: one table)

See docs/batch.md."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

from memora.contracts import (TITLE_CONCEPT_PROMPT, TITLE_CONCEPT_SCORE, TITLE_EVALUATION_PROMPT, TITLE_SIMILARITY,
                              TITLE_TRAIN_LORA)
from memora.fileio import atomic_write

from . import runner as _runner
from . import sweep as _sweep
from .backend import EmbeddedBackend, ServerBackend, pack_root
from .folder import FolderError, ResultsFolder
from .profiles import model_profile
from .results import ResultsStore
from .workflow import Workflow

EXIT_BAD_INPUT = 2
EXIT_JOB_FAILED = 1
EXIT_INTERRUPTED = 130


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of seconds")
    return value


def _add_common(p: argparse.ArgumentParser, workflow: bool = True):
    if workflow:
        p.add_argument("workflow", help="workflow JSON: the editor's Save (UI format) or Export (API)")
    p.add_argument("--sweep", help="CSV, JSON or YAML: one row per job, columns '<node title or id>.<input>'; the "
                                   "field's prompt CSVs (prompt, evaluation_seed, evaluation_guidance) work as-is")
    p.add_argument("--set", action="append", default=[], metavar="ADDRESS=VALUE",
                   help="set an input in every job, e.g. --set 'Train LoRA.steps=100' (repeatable)")
    p.add_argument("--server", action="append", default=[], metavar="URL",
                   help="run on this ComfyUI server instead of in-process (repeatable: jobs spread over servers)")
    p.add_argument("--out", help="results folder (default: memora-output/<workflow name>)")
    p.add_argument("--comfyui", help="ComfyUI checkout for embedded runs (default: $COMFYUI_PATH, ~/comfy/ComfyUI)")
    p.add_argument("--base-directory", help="embedded: ComfyUI base directory (models/, input/, output/)")
    p.add_argument("--custom-nodes", action="append", default=[], metavar="DIR",
                   help="embedded: also load this custom node pack (repeatable)")
    p.add_argument("--all-custom-nodes", action="store_true",
                   help="embedded: load every pack in the checkout's custom_nodes folder, as the server does")
    p.add_argument("--cpu", action="store_true", help="embedded: run on the CPU even when a GPU is present")
    p.add_argument("--models", choices=["checkpoints", "micro"], default=None,
                   help="micro: replace the loaders titled 'Original model', 'Unlearned model' and 'Never-learned "
                        "model' by the built-in micro world (MemoRa Load Micro World)")
    p.add_argument("--original", metavar="CKPT", help="checkpoint for the loader titled 'Original model'")
    p.add_argument("--unlearned", metavar="FILE",
                   help="the unlearned model for the loader titled 'Unlearned model': a full checkpoint "
                        "(models/checkpoints) or any file MemoRa Load Unlearned Model reads (UNet-only, partial, "
                        "text-encoder-only, LoRA-shaped, diffusers folder: models/unlearned, unet, loras), merged "
                        "onto --original's checkpoint; the loader is picked from the file")
    p.add_argument("--concept", metavar="TEXT", help="sets the node titled 'Concept prompt' (and 'Evaluation "
                                                     "prompt' unless --eval-prompt or the sweep sets it)")
    p.add_argument("--eval-prompt", metavar="TEXT", help="sets the node titled 'Evaluation prompt'")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: sampling steps <= 2, training <= 2 updates, 64 px images")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything, print every input it would set and the jobs; run nothing")
    p.add_argument("--no-retry-failed", action="store_true", help="also skip jobs that failed in an earlier run")
    p.add_argument("--timeout", type=_positive_seconds, default=None,
                   help="server mode: seconds before a job is given up")
    p.add_argument("--force", action="store_true",
                   help="replace results.csv / report.md / curve.json in the results folder even if memora-batch "
                        "did not write them (resuming into memora-batch's own results folder needs no --force)")
    p.add_argument("--output-prefix", default=None,
                   help="folder (under ComfyUI's output) for each job's saved files; default "
                        "memora-batch/<workflow>/<job key>; '' keeps the workflow's own prefixes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cluster(p)


def _add_cluster(p: argparse.ArgumentParser):
    """--ray / --slurm and their options (docs/batch.md, 'On a cluster')."""
    g = p.add_argument_group("cluster (docs/batch.md: 'On a cluster')")
    g.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster, one embedded ComfyUI per worker: 'auto' (the default: the cluster "
                        "this machine belongs to), HOST:PORT, ray://HOST:PORT, or 'local' (start Ray here)")
    g.add_argument("--ray-gpus-per-worker", type=_non_negative, default=None, metavar="N",
                   help="GPUs per worker (default 1 when the cluster has GPUs, else 0)")
    g.add_argument("--ray-cpus-per-worker", type=_non_negative, default=1.0, metavar="N",
                   help="CPUs per worker (default 1)")
    g.add_argument("--ray-workers", type=_positive_int, default=None, metavar="N",
                   help="number of workers (default: as many as the cluster's resources allow)")
    g.add_argument("--ray-shared-output", action="store_true",
                   help="the workers' ComfyUI output folder is on a file system the driver shares: leave the files "
                        "there (default: send them back into <results folder>/files/)")
    g.add_argument("--max-retries", type=_non_negative_int, default=2, metavar="N",
                   help="--ray: times a job whose worker died runs again on another worker (default 2); with "
                        "--slurm a rerun of the command resumes a shard that died")
    g.add_argument("--slurm", action="store_true",
                   help="submit the sweep to SLURM through submitit, as a job array of shards")
    g.add_argument("--slurm-partition", default=None, metavar="NAME", help="SLURM partition")
    g.add_argument("--slurm-gpus", type=_non_negative_int, default=1, metavar="N", help="GPUs per shard (default 1)")
    g.add_argument("--slurm-time", type=_positive_int, default=60, metavar="MINUTES",
                   help="time limit per shard in minutes (default 60)")
    g.add_argument("--slurm-shards", type=_positive_int, default=None, metavar="N",
                   help="shards in the job array (default: one per group of jobs sharing upstream work, at most 32)")
    g.add_argument("--slurm-executor", choices=["slurm", "local"], default="slurm",
                   help="local: run the shards as local processes (submitit's local executor), to try it out")


def _add_scoreboard(p: argparse.ArgumentParser):
    """memora-batch scoreboard's own options (docs/attacks.md)."""
    p.add_argument("--attacks", default="all", metavar="A,B",
                   help="which attacks (default all): no-attack, memora, automemora, multi-memora, direct-relearning, "
                        "concept-resurgence, textual-inversion, adversarial-prompt, concept-vector, "
                        "noise-injection-probe, inpainting-probe; the no-attack baseline always runs")
    p.add_argument("--control", default=None, metavar="MODEL",
                   help="the never-learned control for direct relearning: a micro-world variant with --models micro "
                        "(e.g. never_learned), else a checkpoint for 'Unlearned model'")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="--models micro: the micro-world variant under test (default: the workflows' 'Unlearned "
                        "model', the world's ESD-x model)")
    p.add_argument("--kept-concept", default=None, metavar="TEXT",
                   help="concept resurgence: the prompt of an unrelated concept the model kept (micro world: the "
                        "first concept the variant did not erase)")
    p.add_argument("--other-concept", default=None, metavar="TEXT",
                   help="Multi-MemoRa: the prompt of another concept the model erased (micro world: from the "
                        "variant; without one Multi-MemoRa is skipped, saying so)")
    for name, what in (("eval-steps", "sampling steps of every evaluation (and of the probes)"),
                       ("eval-images", "images per evaluated model (the n of each rate)"),
                       ("train-steps", "LoRA updates of every MemoRa LoRA Train"),
                       ("attack-steps", "optimisation steps of textual inversion and the adversarial prompt")):
        p.add_argument(f"--{name}", type=_positive_int, default=None, metavar="N", help=what)


def _number(text: str, kind, test, expected: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not test(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    return value


def _non_negative(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def _non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "an integer > 0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memora-batch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog="See docs/batch.md")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a workflow over a sweep")
    _add_common(p_run)
    p_curve = sub.add_parser("curve", help="sweep LoRA training steps; print the short-/long-term forgetting verdict")
    _add_common(p_curve)
    p_curve.add_argument("--steps", default="10,50,100,250,500", help="training steps (comma-separated)")
    p_curve.add_argument("--train-node", default=TITLE_TRAIN_LORA, help="title of the MemoRa LoRA Train node")
    p_curve.add_argument("--lora-seeds", default=None, metavar="1,2,3",
                         help="LoRA training seeds: one curve per seed, one training each (default: the workflow's)")
    p_curve.add_argument("--control", default=None, metavar="MODEL",
                         help="the never-learned control, measured the same way: a micro-world variant with "
                              "--models micro (e.g. never_learned), else a checkpoint for 'Unlearned model'; gives "
                              "the Fisher test per budget and the recovery verdict (docs/evaluation.md)")
    p_curve.add_argument("--tested", default=None, metavar="MODEL,MODEL",
                         help="the models under test, each measured like the control on the 'Unlearned model' "
                              "loader (micro-world variants with --models micro, e.g. esd_x,uce; else checkpoints); "
                              "default: the workflow's own unlearned model (with --models micro: esd_x)")
    p_curve.add_argument("--no-snapshots", action="store_true",
                         help="train once per budget, each on its own learning-rate schedule, instead of once per seed "
                              "with snapshots (the curve before snapshots existed; slower)")
    p_curve.add_argument("--detector", default=None,
                         help="metric column holding the concept detector rate of the recovered model (default: "
                              "the first '*rate*' / 'recovered' score column found)")
    p_curve.add_argument("--similarity", default=None,
                         help="metric column holding the similarity to the original model (default: the first "
                              "'*ssim*' score column found)")
    p_demo = sub.add_parser("demo", help="MemoRa recovery end to end: the built-in micro world, or your models")
    _add_common(p_demo, workflow=False)
    p_demo.add_argument("--workflow", default=None, help="default: example_workflows/memora_recovery.json")
    p_score = sub.add_parser("scoreboard", help="every recovery attack on one unlearned model and one concept: one "
                                                "table (rate, interval, similarity, cost, knowledge; docs/attacks.md)")
    _add_common(p_score, workflow=False)
    _add_scoreboard(p_score)
    p_res = sub.add_parser("rescore", help="count every rate of a results folder again under another scoring "
                                           "convention, from the stored detections (no model runs)")
    p_res.add_argument("results", help="results folder of a memora-batch run (its --out)")
    p_res.add_argument("--convention", required=True,
                       help="unlearndiffatk, erasediff, memora-reference, resnet50-top1, resnet50-top5, micro-top1, "
                            "clip-zeroshot-style, artist-top1, artist-top5, 'custom:threshold=T,classes=A,B' or "
                            "'custom:top=K' (docs/evaluation.md)")
    p_res.add_argument("--force", action="store_true",
                       help="replace results.<convention>.csv / asr.<convention>.csv files memora-batch did not write")
    p_conv = sub.add_parser("convert", help="convert a UI-format workflow to API format")
    p_conv.add_argument("workflow")
    p_conv.add_argument("-o", "--output", help="write here (default: stdout); an existing file only with --force, "
                                                "and never the input workflow itself")
    p_conv.add_argument("--force", action="store_true", help="replace an existing --output file")
    p_conv.add_argument("--server", action="append", default=[], help="read node definitions from this server")
    p_conv.add_argument("--comfyui", help="ComfyUI checkout (embedded node definitions)")
    return parser


# -- building blocks shared by the subcommands -----------------------------------------------------------------------
def _embedded_options(args) -> dict:
    return {"comfy_path": args.comfyui, "base_directory": getattr(args, "base_directory", None),
            "custom_nodes": tuple(getattr(args, "custom_nodes", []) or []),
            "all_custom_nodes": getattr(args, "all_custom_nodes", False), "cpu": True if args.cpu else None}


def _backend(args):
    chosen = [o for o, on in (("--server", args.server), ("--ray", getattr(args, "ray", None)),
                              ("--slurm", getattr(args, "slurm", False))) if on]
    if len(chosen) > 1:
        raise _sweep.SweepError(f"{' and '.join(chosen)}: choose one place to run the jobs")
    if args.server:
        return ServerBackend(args.server)
    if getattr(args, "ray", None):
        from .ray_backend import RayBackend

        return RayBackend(args.ray, _embedded_options(args), gpus_per_worker=args.ray_gpus_per_worker,
                          cpus_per_worker=args.ray_cpus_per_worker, workers=args.ray_workers,
                          max_retries=args.max_retries, shared_output=args.ray_shared_output)
    if getattr(args, "slurm", False):
        from .slurm import SlurmBackend

        return SlurmBackend(_embedded_options(args), partition=args.slurm_partition, gpus=args.slurm_gpus,
                            time_min=args.slurm_time, shards=args.slurm_shards, executor=args.slurm_executor)
    return EmbeddedBackend.boot(**_embedded_options(args))


def _texts(args, sweep_columns: list[str]) -> dict:
    """--concept / --eval-prompt: {node title: text}."""
    texts = {}
    if args.concept is not None:
        texts[TITLE_CONCEPT_PROMPT] = args.concept
    eval_prompt = args.eval_prompt if args.eval_prompt is not None else args.concept
    if eval_prompt is not None and not _sweep_sets_eval_prompt(sweep_columns):
        texts[TITLE_EVALUATION_PROMPT] = eval_prompt
    return texts


def _sweep_sets_eval_prompt(columns: list[str]) -> bool:
    return "prompt" in columns or any(c.startswith(TITLE_EVALUATION_PROMPT + ".") for c in columns)


def prepare(args, workflow_path: str, extra_rows: Optional[list[dict]] = None, profile_edit=None):
    workflow = Workflow.load(workflow_path)
    rows = _sweep.load_rows(args.sweep) if args.sweep else []
    if extra_rows:
        rows = [{**r, **e} for r in (rows or [{}]) for e in extra_rows]
    columns = list(dict.fromkeys(c for r in rows for c in r))
    backend = _backend(args)
    try:
        profile = model_profile(args.models, args.original, args.unlearned, backend)
        if profile_edit is not None:  # memora-batch curve: the snapshot jobs load LoRA files instead of training
            profile = profile_edit(profile)
        if _sweep_sets_eval_prompt(columns):
            profile.texts.pop(TITLE_EVALUATION_PROMPT, None)
        plan = _runner.plan_jobs(workflow, backend, rows, _sweep.parse_set_texts(args.set), profile,
                                 quick=args.quick, texts=_texts(args, columns))
    except BaseException:
        backend.close()
        raise
    return backend, plan


def _results_dir(args, name: str) -> Path:
    return Path(args.out) if args.out else _runner.default_results_dir(name)


def print_dry_run(plan, backend) -> None:
    """Every input the run would set before the sweep (with the option it comes from), then each job's own."""
    print(f"{len(plan.jobs)} job(s) for {plan.workflow.name} on {backend.describe()}")
    if plan.settings:
        print("set in every job:")
        width = max(len(s.address) for s in plan.settings)
        for s in plan.settings:
            shown = "(not in this workflow: nothing set)" if s.value is None else \
                f"replaced by {s.value}" if s.swap else f"= {s.value!r}"
            print(f"  {s.address:<{width}}  {shown}  [{s.source}]")
    print("jobs:")
    for job in plan.jobs:
        print(f"  {job.key}  {json.dumps(job.overrides, default=str)}")


def execute(args, backend, plan, results_dir: Path, after=None, detector: Optional[str] = None,
            curve: Optional[dict] = None):
    """Run the plan into ``results_dir`` holding its lock; ``after(results_dir)`` runs under the lock too, before
    the reports (report.md, report.html; ``detector``: the concept-rate column, ``curve``: a curve run's steps). The
    backend is closed (cluster workers let go) when this returns."""
    try:
        return _execute(args, backend, plan, results_dir, after, detector, curve)
    finally:
        backend.close()


def _execute(args, backend, plan, results_dir: Path, after=None, detector: Optional[str] = None,
             curve: Optional[dict] = None):
    prefix = _runner.checked_output_prefix(plan, args.output_prefix)
    if args.dry_run:
        print_dry_run(plan, backend)
        return None
    from .report import write_reports

    if getattr(args, "models", None) == "micro":  # run, curve, scoreboard, demo: one micro world per folder
        claim_for_micro_world(results_dir)
    with ResultsFolder(results_dir, force=args.force) as folder:
        print(f"memora-batch: {len(plan.jobs)} job(s) of {plan.workflow.name} on {backend.describe()}; "
              f"results in {results_dir}", file=sys.stderr, flush=True)
        with _runner.comfyui_log(backend, results_dir) as log:
            summary = _runner.run_plan(plan, backend, results_dir, retry_failed=not args.no_retry_failed,
                                       progress=not args.no_progress, output_prefix=prefix,
                                       job_timeout=args.timeout, folder=folder)
        if after is not None:
            after(results_dir)
        detector = detector or (plan.profile.detector_metric if plan.profile else None)
        reports = write_reports(results_dir, plan.workflow.name, detector, curve)
        print(f"memora-batch: {summary.ok} ok, {summary.failed} failed, {summary.skipped} already done"
              + (f", {summary.not_run} not run" if summary.not_run else "")
              + (f", {summary.retried} re-run after a worker died" if summary.retried else ""))
        if len(summary.workers) > 1 or summary.retried:
            print(f"  per worker: {summary.per_worker()}")
        print(f"  results: {results_dir / 'results.csv'} (and results.jsonl)")
        print("  report:  " + " and ".join(str(p) for p in reports if p is not None))
        if log is not None:
            print(f"  ComfyUI's own output: {log}")
    return summary


# -- subcommands -----------------------------------------------------------------------------------------------------
def report_asr(results_dir: Path, name: str = "asr.csv") -> None:
    """The attack success rate over the prompt set per score node (per model): printed and written to asr.csv."""
    rows = _sweep.attack_success(ResultsStore(results_dir).latest())
    if not rows:
        return
    path = _sweep.write_asr(results_dir, rows, name)
    print("attack success rate over the prompt set (a prompt succeeds when any of its images is flagged):")
    for line in _sweep.format_asr(rows):
        print("  " + line)
    print(f"  asr:     {path}")


def cmd_run(args) -> int:
    backend, plan = prepare(args, args.workflow)
    results_dir = _results_dir(args, plan.workflow.name)
    summary = execute(args, backend, plan, results_dir, after=report_asr)
    return 0 if summary is None or summary.failed == 0 and summary.not_run == 0 else EXIT_JOB_FAILED


def cmd_curve(args) -> int:
    from .curve import LABEL_MODEL, LABEL_UPDATES, parse_steps, parse_tested, run_curve, tested_name

    def execute_curve(args_, backend, plan, results_dir, after=None):
        # every execution of the curve also writes asr.csv and the reports (report.html: the curve chart)
        def after_all(d):
            report_asr(d)
            if after is not None:
                after(d)
        detector = args.detector or (plan.profile.detector_metric if plan.profile else None)
        curve = {"steps": parse_steps(args.steps), "train_node": args.train_node, "label_updates": LABEL_UPDATES,
                 "label_model": LABEL_MODEL,
                 "tested": (parse_tested(args.tested) or [tested_name(args.models == "micro")])[0]}
        return execute(args_, backend, plan, results_dir, after=after_all, detector=detector, curve=curve)

    return run_curve(args, prepare, execute_curve, _results_dir)


MICRO_WORLD_MARK = "micro-world.json"


def claim_for_micro_world(results_dir: Path) -> Optional[Path]:
    """A results folder of a micro-world run holds one micro world's results: its jobs are keyed by the graph, and
    the graph names a variant, not the weights. A folder whose job records (results.jsonl) were made on another
    micro world (a rebuilt one, one that MEMORA_MICRO_WEIGHTS points at, the world a pack update replaced), or before
    this mark existed, is moved aside, whole, to ``<name>.world-<its manifest's sha256, 12 digits>`` (``unknown``
    without the mark), so that its jobs are not taken for this world's as already done; a folder without job
    records is left where it is (nothing in it could be resumed). Then the folder is marked with this world's
    manifest sha256. Returns the folder it moved aside, if any."""
    from memora.micro import world

    manifest = world.weights_dir() / world.MANIFEST
    current = world.sha256_file(manifest)
    mark = results_dir / MICRO_WORLD_MARK
    try:
        earlier = json.loads(mark.read_text())["manifest_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        earlier = None
    aside = None
    if earlier != current and (results_dir / "results.jsonl").exists():
        from .folder import move_aside

        aside = move_aside(results_dir, f"{results_dir.name}.world-{(earlier or 'unknown')[:12]}")
        print(f"memora-batch: {results_dir} held another micro world's results; moved to {aside.name}",
              file=sys.stderr, flush=True)
    if earlier != current:
        results_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(mark, json.dumps({"manifest_sha256": current, "manifest": str(manifest)}) + "\n", replace=True)
    return aside


def cmd_demo(args) -> int:
    """memora_recovery end to end: on the built-in micro world by default, on your checkpoints with
    --original/--unlearned. Prints where the LoRA, the images and the report went."""
    root = pack_root()
    wf = args.workflow or (str(root / "example_workflows" / "memora_recovery.json") if root else None)
    if not wf or not Path(wf).is_file():
        raise FileNotFoundError("example_workflows/memora_recovery.json not found; pass --workflow")
    own_models = bool(args.original or args.unlearned)
    if own_models and not (args.original and args.unlearned):
        raise _sweep.SweepError("with your own models pass both --original and --unlearned (checkpoint file names "
                                "in ComfyUI's models/checkpoints)")
    if args.models is None and not own_models:
        args.models = "micro"
    backend, plan = prepare(args, wf)
    results_dir = _results_dir(args, "demo-micro-world" if args.models == "micro" else "demo")
    if plan.profile and plan.profile.description and not args.dry_run:
        print(f"memora-batch demo: {Path(wf).name} on the {plan.profile.description}", flush=True)
    summary = execute(args, backend, plan, results_dir)
    if summary is None:
        return 0
    from .report import print_where

    concept_metric = plan.profile.detector_metric if plan.profile else None
    suffix = concept_metric.split(")", 1)[1] if concept_metric else ".rate"

    base = suffix[:-len(".rate")] if suffix.endswith(".rate") else suffix
    rate_cells = tuple(base + c for c in (".rate", ".n", ".ci_low", ".ci_high", ".convention")) + (suffix,)

    def headline(metric: str) -> bool:  # the concept's rate with its n, interval and convention
        return ((metric.startswith(TITLE_CONCEPT_SCORE) and metric.endswith(rate_cells))
                or (metric.startswith(TITLE_SIMILARITY) and metric.endswith((".ssim", ".psnr")))
                or metric.endswith(".final_loss"))

    print_where(results_dir, backend, headline, keys=[job.key for job in plan.jobs])
    return 0 if summary.failed == 0 else EXIT_JOB_FAILED


def cmd_scoreboard(args) -> int:
    """Every attack of memora_batch/attacks.py on one unlearned model and one concept: scoreboard.csv / .json /
    .md in the results folder and a chart in report.html (docs/attacks.md)."""
    from .scoreboard import ScoreboardError, run_scoreboard

    if args.variant and args.models != "micro":
        raise ScoreboardError(f"--variant {args.variant!r} chooses a micro-world model: it needs --models micro")
    if args.variant:
        from memora.micro import world

        world.check_variant(args.variant)
    if args.models != "micro" and not args.original:
        raise ScoreboardError("the attacks that need images of the concept (MemoRa, AutoMemoRa, direct relearning, "
                              "textual inversion, adversarial prompt, inpainting probe) take them from the original "
                              "model's seed images, and every attacked image is compared with the original's: give "
                              "--original CKPT (the model before unlearning) with --unlearned, or --models micro")
    return run_scoreboard(args, prepare, execute, _results_dir, pack_root())


def _check_convert_output(args) -> None:
    """convert never writes over its input, nor over an existing file without --force (checked before converting)."""
    if not args.output:
        return
    out = Path(args.output)
    if out.exists() and Path(args.workflow).exists() and os.path.samefile(out, args.workflow):
        raise FileExistsError(f"-o {args.output} is the input workflow itself: converting would replace the UI "
                              f"workflow by its API version; write the API version to another file")
    if out.exists() and not args.force:
        raise FileExistsError(f"-o {args.output} exists; pass --force to replace it, or choose another file")
    if out.is_dir():
        raise FileExistsError(f"-o {args.output} is a folder; give a file name")


def cmd_convert(args) -> int:
    _check_convert_output(args)
    workflow = Workflow.load(args.workflow)
    backend = ServerBackend(args.server) if args.server else EmbeddedBackend.boot(args.comfyui)
    workflow.check_installed(backend.available_types(), backend.describe())
    types = set(workflow.required_node_types()) | {n.get("type") for n in (workflow.ui or {}).get("nodes", [])
                                                   if isinstance(n, dict)}
    api = workflow.to_api(backend.object_info(sorted(t for t in types if isinstance(t, str))))
    text = json.dumps(api, indent=2)
    if args.output:
        atomic_write(args.output, text + "\n", replace=args.force)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_rescore(args) -> int:
    from .rescore import rescore_folder

    result, files = rescore_folder(args.results, args.convention, force=args.force)
    print(f"memora-batch rescore: {len(result.rescored)} score table(s) counted again under {args.convention}")
    for node, why in sorted(result.skipped.items()):
        print(f"  not rescored: {node}: {why}")
    rows = _sweep.attack_success(result.records)
    for line in _sweep.format_asr(rows):
        print("  " + line)
    for f in files:
        print(f"  wrote {f}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "curve": cmd_curve, "demo": cmd_demo, "convert": cmd_convert,
               "rescore": cmd_rescore, "scoreboard": cmd_scoreboard}[args.command]
    from .backend import BackendFailed
    from .results import ResultsError
    from .server_client import AllServersFailed, ServerUnreachable
    from .workflow import WorkflowError

    try:
        return handler(args)
    except (WorkflowError, _sweep.SweepError, ServerUnreachable, FileNotFoundError, FileExistsError, FolderError,
            ResultsError, ValueError) as e:
        print(f"memora-batch: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (AllServersFailed, BackendFailed) as e:
        print(f"memora-batch: {e}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except KeyboardInterrupt:
        print("\nmemora-batch: interrupted; finished jobs are saved, rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
