"""Regenerates the micro world's results page: docs/micro-world-results.md, .json and img/micro-world-curves.png.

Issue 19's evidence, measured by ``memora-batch`` on the shipped workflows (change the model names and the same
commands run on real models, docs/micro-world-results.md says how):

- ``curves``: ``memora-batch curve example_workflows/memora_recovery_micro.json --models micro --tested <variant>
  --lora-seeds <seed>`` for every variant and the never-learned control (one training per variant and seed, LoRA
  snapshots at every budget), then the kept concepts evaluated on the same snapshots (``memora-batch run`` with the
  training node replaced by a LoRA loader, as the curve's own snapshot jobs do); the recovery verdict of
  ``memora.evaluation.recovery`` per variant;
- ``auto``: ``memora-batch run example_workflows/automemora.json --models micro`` on the ESD-x snapshots, w = 1, 2, 3;
- ``multi``: ``memora-batch run example_workflows/multi_memora.json --models micro`` on ``esd_x_star_cross``: one LoRA
  per concept (star, cross), merged by concat and by TIES, each single LoRA (the other's weight 0);
- ``ablations``: ``memora-batch curve`` on ESD-x with one knob changed at a time.

Every part runs as units (one ``memora-batch`` call each, a folder under ``--out``); ``--jobs`` units run side by side
(one torch thread each); a unit whose folder holds ``done.json`` for the same settings is skipped (resume). The tables
are built from the units' results (:func:`build`), so ``--report-only`` rewrites the page from the stored results.

    python scripts/micro_world_results.py --estimate                  # a tiny run, then each part's estimated time
    python scripts/micro_world_results.py --jobs 2                    # everything (the lead's command)
    python scripts/micro_world_results.py --quick --out /tmp/q        # a few images, one seed: the pipeline end to end
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from memora.contracts import TITLE_TRAIN_LORA  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import micro_world_tables as tables  # noqa: E402

WORKFLOWS = {"recovery": "example_workflows/memora_recovery_micro.json", "auto": "example_workflows/automemora.json",
             "multi": "example_workflows/multi_memora.json"}
PARTS = ("curves", "auto", "multi", "ablations")
CONTROL = "never_learned"
TESTED = "esd_x"                 # recovery strength, AutoMemoRa and the ablations
TWO_CONCEPTS = "esd_x_star_cross"
UPDATES = (25, 50, 100, 200, 400)
WEIGHTS = (1.0, 2.0, 3.0)        # AutoMemoRa's w
#: ablations of ESD-x: knob -> {value: the memora-batch --set of that value}; the default (15, 11, 6, 4) is the
#: curves part's ESD-x curve. Two seed images would be one seed pair: the workflow's seed nodes make 3 pairs x
#: 'Seed image size.batch_size' images, so its smallest set is 6 (not measured: 2).
ABLATIONS = {
    "inversion start step (of 50)": {5: ["Invert A.start_at_step=5", "Invert B.start_at_step=5",
                                         "Regenerate.start_at_step=5"],
                                     30: ["Invert A.start_at_step=30", "Invert B.start_at_step=30",
                                          "Regenerate.start_at_step=30"]},
    "slerp points per pair": {3: ["Slerp pairs.intervals=2"]},
    "seed images": {12: ["Seed image size.batch_size=2"]},
    "LoRA rank": {1: ["Train LoRA.rank=1", "Train LoRA.alpha=1"], 16: ["Train LoRA.rank=16", "Train LoRA.alpha=16"]},
}
ABLATION_DEFAULTS = {"inversion start step (of 50)": 15, "slerp points per pair": 11, "seed images": 6,
                     "LoRA rank": 4}


@dataclass
class Config:
    out: Path
    seeds: list
    images: int
    sample_steps: int
    updates: list
    variants: list
    kept: list
    jobs: int = 1
    quick: bool = False
    comfyui: Optional[str] = None

    def signature(self) -> dict:
        """The settings a unit's results depend on, with the micro world's manifest hash (new weights: new runs)."""
        from memora.micro import world

        d = asdict(self)
        for k in ("out", "jobs", "comfyui", "seeds", "variants"):  # a unit's own seed and model are in its name
            d.pop(k)
        d["weights"] = world.sha256_file(world.weights_dir() / "manifest.json")[:16]
        return d


@dataclass
class Unit:
    part: str
    name: str
    kind: str                       # curve | auto | multi
    tested: str = TESTED
    seed: int = 1
    sets: list = field(default_factory=list)
    needs: list = field(default_factory=list)   # units whose LoRAs this one reads (auto: the ESD-x curves)

    def folder(self, cfg: Config) -> Path:
        return cfg.out / self.part / self.name


# -- the units ----------------------------------------------------------------------------------------------------
def common_sets(cfg: Config) -> list[str]:
    """Evaluation and training settings shared by every curve: IMAGES per point, DDIM sample_steps, the LoRA
    batch as one forward pass (4 x 1, the reference's 4 samples per update)."""
    sets = [f"Evaluation image size.batch_size={cfg.images}", "Train LoRA.batch_size=4",
            "Train LoRA.gradient_accumulation=1"]
    sets += [f"Evaluate {m}.steps={cfg.sample_steps}" for m in ("original", "unlearned", "recovered")]
    if cfg.quick:  # the seed images with fewer DDIM steps too (the reference's 50 elsewhere)
        sets += [f"Seed image {i}{ab}.steps=10" for i in (1, 2, 3) for ab in "ab"]
    return sets


def units(cfg: Config, parts: list[str]) -> list[Unit]:
    out = []
    variants = [TESTED] if cfg.quick else cfg.variants
    for v in variants + [CONTROL]:
        for s in cfg.seeds:
            if "curves" in parts or (v == TESTED and "auto" in parts):
                out.append(Unit("curves", f"{v}-seed{s}", "curve", v, s))
    if "auto" in parts:
        out += [Unit("auto", f"seed{s}", "auto", TESTED, s, needs=[f"{TESTED}-seed{s}"]) for s in cfg.seeds]
    if "multi" in parts:
        out += [Unit("multi", f"seed{s}", "multi", TWO_CONCEPTS, s) for s in cfg.seeds]
    if "ablations" in parts:
        for knob, values in ABLATIONS.items():
            for value, sets in values.items():
                if cfg.quick and knob != "LoRA rank":
                    continue  # --quick: one knob value (rank 1) shows the table's plumbing
                slug = knob.split(" (")[0].replace(" ", "_")
                out += [Unit("ablations", f"{slug}-{value}-seed{s}", "curve", TESTED, s, sets=list(sets))
                        for s in cfg.seeds if not cfg.quick or value == 1]
    return out


def _settings_in(marker: Path):
    """The settings a unit's marker file (done.json, started.json) records; None when absent or unreadable."""
    try:
        return json.loads(marker.read_text()).get("settings")
    except (OSError, ValueError):
        return None


def is_done(unit: Unit, cfg: Config) -> bool:
    return _settings_in(unit.folder(cfg) / "done.json") == {**cfg.signature(), "sets": unit.sets}


def set_aside_stale(folder: Path, settings: dict) -> None:
    """A unit folder started with other settings (other weights: the signature holds the manifest's hash) is moved
    to ``<name>.stale-<time>`` before the unit runs: its memora-batch jobs have other keys, so their records would
    sit beside the new ones and be counted with them. A folder started with these settings is kept (memora-batch
    resumes its finished jobs). ``started.json`` records the settings a unit started with."""
    marker = folder / "started.json"
    if folder.is_dir() and any(folder.iterdir()):
        # done.json: a unit finished before started.json existed
        if settings not in (_settings_in(marker), _settings_in(folder / "done.json")):
            aside = folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            print(f"  {folder.name}: results of other settings moved to {aside.name}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        from memora.fileio import atomic_write

        atomic_write(marker, json.dumps({"settings": settings}) + "\n", replace=True)


def run_unit(unit: Unit, cfg: Config) -> float:
    """One unit in a child process (one torch thread), its output in <folder>/log.txt; seconds."""
    folder = unit.folder(cfg)
    set_aside_stale(folder, {**cfg.signature(), "sets": unit.sets})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    spec = json.dumps({"unit": asdict(unit), "config": {**asdict(cfg), "out": str(cfg.out)}})
    t0 = time.time()
    with open(folder / "log.txt", "a") as log:
        rc = subprocess.call([sys.executable, str(Path(__file__).resolve()), "--worker", spec], env=env,
                             stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    seconds = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"unit {unit.part}/{unit.name} failed (exit {rc}); see {folder / 'log.txt'}")
    from memora.fileio import atomic_write

    atomic_write(folder / "done.json", json.dumps({"settings": {**cfg.signature(), "sets": unit.sets},
                                                  "seconds": round(seconds, 1)}) + "\n", replace=True)
    return seconds


def run_all(todo: list[Unit], cfg: Config) -> None:
    """Units in dependency order (auto after the ESD-x curves), --jobs at a time."""
    first = [u for u in todo if not u.needs]
    later = [u for u in todo if u.needs]
    for batch in (first, later):
        pending = [u for u in batch if not is_done(u, cfg)]
        for u in batch:
            if u not in pending:
                print(f"  {u.part}/{u.name}: done before (resume)", flush=True)
        with ThreadPoolExecutor(max_workers=max(1, cfg.jobs)) as pool:
            futures = {u.name + u.part: pool.submit(run_unit, u, cfg) for u in pending}
            for u in pending:
                seconds = futures[u.name + u.part].result()
                print(f"  {u.part}/{u.name}: {seconds:.0f} s", flush=True)


# -- the worker: one memora-batch call (and the kept concepts of a curve) -----------------------------------------
def batch_options(unit: Unit, cfg: Config) -> list[str]:
    opts = ["--models", "micro", "--base-directory", str(cfg.out / "comfyui"), "--no-progress"]
    return opts + (["--comfyui", cfg.comfyui] if cfg.comfyui else [])


def work(unit: Unit, cfg: Config) -> int:
    import torch

    torch.set_num_threads(1)
    from memora_batch import cli

    folder = unit.folder(cfg)
    if unit.kind == "curve":
        argv = ["curve", str(ROOT / WORKFLOWS["recovery"]), "--tested", unit.tested, "--lora-seeds", str(unit.seed),
                "--steps", ",".join(map(str, cfg.updates)), "--out", str(folder / "curve"), *batch_options(unit, cfg)]
        for s in common_sets(cfg) + unit.sets:
            argv += ["--set", s]
        rc = cli.main(argv)
        if rc == 0 and unit.part == "curves":
            for concept in cfg.kept:
                if concept not in tables.erased_of(unit.tested):
                    evaluate_snapshots(unit, cfg, concept)
        return rc
    if unit.kind == "auto":
        return run_auto(unit, cfg)
    return run_multi(unit, cfg)


def training_loras(curve_dir: Path) -> list[tuple[dict, str, int]]:
    """(the training job's record, LoRA file, updates) of every LoRA a curve's training jobs saved (snapshots and
    the final one)."""
    from memora.lora.recipe import snapshot_step_of
    from memora_batch.results import ResultsStore

    out = []
    for r in ResultsStore(curve_dir).latest():
        if r.get("status") == "ok" and f"{TITLE_TRAIN_LORA}.snapshot_steps" in (r.get("overrides") or {}):
            top = int(r["overrides"][f"{TITLE_TRAIN_LORA}.steps"])
            for lora in r["outputs"]["loras"]:
                step = snapshot_step_of(lora)
                out.append((r, lora, top if step is None else step))
    return out


def evaluate_snapshots(unit: Unit, cfg: Config, concept: str) -> None:
    """The kept concept's rate under every LoRA of the curve (the collateral damage of the recovery): the curve's
    workflow with 'Train LoRA' replaced by ComfyUI's LoRA loader (memora-batch curve's own snapshot jobs), the
    evaluation prompt set to the kept concept's."""
    from memora.micro import world
    from memora_batch import cli, curve

    rows = []
    for rec, lora, updates in training_loras(unit.folder(cfg) / "curve"):
        base = {k: v for k, v in (rec.get("overrides") or {}).items() if not k.startswith(TITLE_TRAIN_LORA + ".")}
        rows.append({**base, **{f"label.{k}": v for k, v in (rec.get("labels") or {}).items()},
                     f"{TITLE_TRAIN_LORA}.lora_name": lora, f"label.{curve.LABEL_UPDATES}": updates})
    out = unit.folder(cfg) / f"kept-{concept}"
    argv = ["run", str(ROOT / WORKFLOWS["recovery"]), "--out", str(out), "--eval-prompt",
            world.load_manifest()["prompts"][concept], *batch_options(unit, cfg)]
    for s in common_sets(cfg):
        if not s.startswith(TITLE_TRAIN_LORA):
            argv += ["--set", s]
    args = cli.build_parser().parse_args(argv)
    backend, plan = cli.prepare(args, args.workflow, rows, profile_edit=curve.loader_profile(TITLE_TRAIN_LORA))
    summary = cli.execute(args, backend, plan, out)
    if summary.failed or summary.not_run:
        raise RuntimeError(f"{summary.failed} kept-concept evaluation job(s) failed; see {out / 'results.csv'}")


def _run_with_sweep(unit: Unit, cfg: Config, workflow: str, rows: list[dict], sets: list[str]) -> int:
    from memora.fileio import atomic_write
    from memora_batch import cli

    folder = unit.folder(cfg)
    sweep = folder / "sweep.json"
    atomic_write(sweep, json.dumps(rows, indent=1) + "\n", replace=True)
    argv = ["run", str(ROOT / WORKFLOWS[workflow]), "--sweep", str(sweep), "--out", str(folder / "run"),
            *batch_options(unit, cfg)]
    for s in sets:
        argv += ["--set", s]
    return cli.main(argv)


def run_auto(unit: Unit, cfg: Config) -> int:
    """AutoMemoRa at each w on every LoRA of the ESD-x curve of this seed (snapshots and final), the evaluation's
    image count, sampler (DDIM, sample_steps) and noise seed as the curves'."""
    from memora.micro import world

    curve_dir = cfg.out / "curves" / unit.needs[0] / "curve"
    rows = [{"MemoRa LoRA.lora_name": lora, "AutoMemoRa Guider.w": w, "label.updates": updates, "label.w": w,
             "label.lora_seed": unit.seed}
            for _, lora, updates in training_loras(curve_dir) for w in WEIGHTS]
    if not rows:
        raise RuntimeError(f"no ESD-x LoRA in {curve_dir}: run the curves part first")
    sets = [f"Prompt.value={world.erased_prompt()}", "Image size.width=64", "Image size.height=64",
            f"Image size.batch_size={cfg.images}", f"Schedule.steps={cfg.sample_steps}",
            "Schedule.scheduler=ddim_uniform", "Sampler.sampler_name=ddim", "Noise.noise_seed=1"]
    return _run_with_sweep(unit, cfg, "auto", rows, sets)


MULTI_CONFIGS = {  # name -> (method, weight of the star LoRA, weight of the cross LoRA)
    "star LoRA alone": ("concat", 1.0, 0.0), "cross LoRA alone": ("concat", 0.0, 1.0),
    "merged: concat (= both stacked)": ("concat", 1.0, 1.0), "merged: TIES": ("ties", 1.0, 1.0)}


def run_multi(unit: Unit, cfg: Config) -> int:
    """multi_memora on the two-concept model: per configuration and concept prompt one job (ComfyUI's cache keeps
    the two trainings between jobs of one process)."""
    from memora.micro import world

    prompts = world.load_manifest()["prompts"]
    rows = [{"Merge LoRAs.method": m, "Merge LoRAs.weight_1": a, "Merge LoRAs.weight_2": b,
             "Evaluation prompt.value": prompts[c], "label.config": name, "label.concept": c,
             "label.lora_seed": unit.seed}
            for name, (m, a, b) in MULTI_CONFIGS.items() for c in ("star", "cross")]
    top = max(cfg.updates)
    sets = [f"Unlearned model.variant={TWO_CONCEPTS}", f"Concept A prompt.value={prompts['star']}",
            f"Concept B prompt.value={prompts['cross']}", f"Evaluation image size.batch_size={cfg.images}",
            f"Sample with the merged LoRA.steps={cfg.sample_steps}", "Sample with the merged LoRA.sampler_name=ddim",
            "Sample with the merged LoRA.scheduler=ddim_uniform", "Sample with the merged LoRA.seed=1"]
    for t in ("Train LoRA (concept A)", "Train LoRA (concept B)"):
        sets += [f"{t}.steps={top}", f"{t}.learning_rate={micro_lr()}", f"{t}.seed={unit.seed}", f"{t}.batch_size=4",
                 f"{t}.gradient_accumulation=1"]
    return _run_with_sweep(unit, cfg, "multi", rows, sets)


def micro_lr() -> float:
    """The micro world's MemoRa learning rate (the profile's, as the curves' trainings use it)."""
    from memora_batch.profiles import micro_world_profile

    return float(micro_world_profile().defaults[f"{TITLE_TRAIN_LORA}.learning_rate"])


# -- the command ----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--seeds", type=int, default=3, help="LoRA training seeds (1..N; default 3)")
    p.add_argument("--images", type=int, default=128, help="evaluation images per point (default 128)")
    p.add_argument("--sample-steps", type=int, default=20,
                   help="DDIM steps of every evaluation image (default 20, as the micro world's build measures)")
    p.add_argument("--jobs", type=int, default=2, help="memora-batch processes side by side (default 2)")
    p.add_argument("--variants", default=None, help="the variants whose curves are measured (comma-separated; "
                                                    "default: every variant of the manifest; the control always)")
    p.add_argument("--kept", default=None, help="kept concepts evaluated under every LoRA (comma-separated; default: "
                                                "the two the original draws best, from the manifest's measurements, "
                                                "besides the star)")
    p.add_argument("--quick", action="store_true", help="8 images, 1 seed, budgets 5,10, DDIM 10: the pipeline end to "
                                                        "end in minutes (the test's setting), not evidence")
    p.add_argument("--out", default=None, help="results folder (default ~/.cache/comfyui-memora/micro-world-results; "
                                               "--quick: .../micro-world-results-quick)")
    p.add_argument("--docs", default=None, help="write the page here (default: docs/ of the pack; --quick: <out>/docs)")
    p.add_argument("--report-only", action="store_true", help="rebuild the page from the stored results")
    p.add_argument("--estimate", action="store_true", help="only the estimate: a tiny timed run, then each part's "
                                                           "estimated time (a full run prints it first too)")
    p.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: $COMFYUI_PATH, ~/comfy/ComfyUI)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config(args) -> Config:
    from memora.micro import world

    variants = [v for v in world.load_manifest()["variants"] if v not in ("original", CONTROL)]
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in variants]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; the micro world's variants: {', '.join(variants)}")
        variants = wanted
    if args.seeds < 1 or args.images < 1 or args.sample_steps < 1 or args.jobs < 1:
        raise SystemExit("--seeds, --images, --sample-steps and --jobs must be whole numbers >= 1")
    cache = Path.home() / ".cache" / "comfyui-memora"
    out = Path(args.out) if args.out else cache / ("micro-world-results-quick" if args.quick else "micro-world-results")
    kept = [c.strip() for c in args.kept.split(",") if c.strip()] if args.kept else default_kept()
    if args.quick:
        return Config(out.resolve(), [1], 8, 10, [5, 10], variants, kept[:1], args.jobs, True, args.comfyui)
    return Config(out.resolve(), list(range(1, args.seeds + 1)), args.images, args.sample_steps, list(UPDATES),
                  variants, kept, args.jobs, False, args.comfyui)


def default_kept() -> list[str]:
    """The two concepts the original model draws best (the build's measured rates), the erased star aside."""
    from memora.micro import world

    rates = world.load_manifest().get("measurements", {}).get("rates", {}).get("original", {})
    best = sorted((c for c in rates if c != tables.ERASED_CONCEPT), key=lambda c: -float(rates[c]["rate"]))
    return best[:2] or ["circle"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        c = spec["config"]
        cfg = Config(**{**c, "out": Path(c["out"])})
        return work(Unit(**spec["unit"]), cfg)
    cfg = config(args)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"--parts: unknown {bad}; expected some of {', '.join(PARTS)}")
    if args.estimate:
        return tables.print_estimate(estimate(cfg, parts))
    t0 = time.time()
    if not args.report_only:
        if not cfg.quick:  # the estimate first (a tiny run, about 20 s), so the wait is known
            tables.print_estimate(estimate(cfg, parts))
        todo = units(cfg, parts)
        print(f"micro-world results: {len(todo)} unit(s) in {cfg.out}, {cfg.jobs} at a time", flush=True)
        run_all(todo, cfg)
    wall = time.time() - t0
    from memora.fileio import atomic_write

    run = {"command": "python scripts/micro_world_results.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "wall_seconds": round(wall, 1), "machine": machine(),
           "settings": {**cfg.signature(), "seeds": cfg.seeds, "variants": cfg.variants,
                        "lora_learning_rate": micro_lr()}}
    if args.report_only and (cfg.out / "run.json").exists():  # the page keeps the run's own command and time
        run = {**json.loads((cfg.out / "run.json").read_text()), "report_rebuilt_by": run["command"]}
    else:
        atomic_write(cfg.out / "run.json", json.dumps(run, indent=1) + "\n", replace=True)
    docs = Path(args.docs) if args.docs else (cfg.out / "docs" if cfg.quick else ROOT / "docs")
    data = tables.collect(cfg, parts)
    data["run"] = run
    atomic_write(cfg.out / "collected.json", json.dumps(data, indent=1) + "\n", replace=True)  # the counts
    tables.write_page(tables.build(data), docs)
    print(f"wrote {docs / 'micro-world-results.md'} (+ .json, img/micro-world-curves.png) after {wall:.0f} s")
    return 0


def machine() -> str:
    import torch

    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end, "
            f"torch {torch.__version__}, {platform.system()}")


def estimate(cfg: Config, parts: list[str]) -> dict:
    """A tiny curve (ESD-x, 1 seed, budgets 4,8, 32 images, DDIM 4: a batch large enough that its time per image
    is near a full run's) timed per job, scaled to each part's jobs."""
    tiny = Config(cfg.out / "estimate", [1], 32, 4, [4, 8], [TESTED], [], 1, True, cfg.comfyui)
    unit = Unit("estimate", "tiny", "curve", TESTED, 1)
    if not is_done(unit, tiny):
        run_unit(unit, tiny)
    return tables.estimate_parts(unit.folder(tiny) / "curve", tiny, cfg, parts, units(cfg, parts))


if __name__ == "__main__":
    raise SystemExit(main())
