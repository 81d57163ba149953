"""``memora-batch curve``: a recovery curve over LoRA training steps, and the short-term / long-term verdict.

Each step count is one job per sweep row (the row's evaluation prompt, seed, guidance); the detector score and the
similarity to the original model are averaged over the rows of each step count, and the curve goes to
``memora.evaluation.forgetting`` for the verdict (its rule and thresholds are printed with it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from memora.contracts import TITLE_UNLEARNED_MODEL
from memora.fileio import atomic_write

from .results import ResultsStore
from .sweep import CURVE_LABELS


def curve_rows(train_node: str, steps: list[int]) -> list[dict]:
    return [{f"{train_node}.steps": s} for s in steps]


def pick_metric(columns: list[str], wanted: Optional[str], hints: tuple[str, ...], avoid: tuple[str, ...] = ()) -> Optional[str]:
    if wanted:
        if wanted in columns:
            return wanted
        raise ValueError(f"metric {wanted!r} not in the results; metrics: {', '.join(columns) or '(none)'}")
    for hint in hints:
        for c in columns:
            low = c.lower()
            if all(h in low for h in hint.split("+")) and not any(a in low for a in avoid):
                return c
    return None


def check_metric_names(plan, given: dict) -> None:
    """ValueError before any job runs when a metric named on the command line (``{option: name}``) cannot be a
    column of this workflow's results: a column is ``<node title>.<name>``, so the name must begin with one of the
    workflow's node titles (or ids) followed by a dot and the score's name."""
    job = plan.jobs[0] if plan.jobs else None
    if job is None:
        return
    titles = sorted({str(job.titles.get(str(nid), nid)) for nid in job.api})
    for option, name in given.items():
        if name is None:
            continue
        if not any(name.startswith(t + ".") and len(name) > len(t) + 1 for t in titles):
            raise ValueError(f"{option} {name!r}: expected '<node title>.<score>' naming a node of this workflow "
                             f"(e.g. 'Concept score (recovered).rate'); node titles: {', '.join(titles)}")


DETECTOR_HINTS = ("recovered+rate", "recovered+score", "recovered+detect", "rate")
SIMILARITY_HINTS = ("recovered+ssim", "ssim", "similarity", "psnr")


def aggregate(records: list[dict], train_node: str, steps: list[int], metric: Optional[str]) -> list[Optional[float]]:
    """Mean of ``metric`` over the ok jobs of each step count (None where there is none)."""
    out = []
    for s in steps:
        vals = []
        for r in records:
            if r.get("status") != "ok" or metric is None:
                continue
            done = (r.get("labels") or {}).get(LABEL_UPDATES, r.get("overrides", {}).get(f"{train_node}.steps", -1))
            if int(done) != s:
                continue
            v = r.get("metrics", {}).get(metric)
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                vals.append(float(v))
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def print_verdict(results_dir: "str | Path", train_node: str, steps: list[int], detector: Optional[str],
                  similarity: Optional[str]) -> int:
    """Aggregate the curve from the results, print it with the verdict, write curve.json. Returns the exit status."""
    records = [r for r in ResultsStore(results_dir).latest() if r.get("status") == "ok"]
    if not records:
        print("\nrecovery curve: no finished jobs to judge (every job failed or none ran); see results.csv")
        return 0
    columns = list(dict.fromkeys(k for r in records for k in r.get("metrics", {})))
    det = pick_metric(columns, detector, DETECTOR_HINTS, avoid=("original", "unlearned"))
    sim = pick_metric(columns, similarity, SIMILARITY_HINTS, avoid=("unlearned",))
    det_curve = aggregate(records, train_node, steps, det)
    sim_curve = aggregate(records, train_node, steps, sim)
    # The original and unlearned models' scores (same prompts and seeds) anchor the recovery scale when present.
    ref = _mean_over(records, _sibling(det, columns, "original"))
    base = _mean_over(records, _sibling(det, columns, "unlearned"))
    metric = _similarity_kind(sim)
    print("")
    print(f"recovery curve over {len(records)} finished job(s); detector: {det or '(none found)'}; "
          f"similarity: {sim or '(none found)'}")
    try:
        from memora.evaluation.forgetting import verdict
    except ImportError:  # pragma: no cover - the pack ships it
        verdict = None
    result = None
    if det is None:
        print("  no detector metric in the results: give --detector <metric column> (see results.csv)")
    elif verdict is not None:
        kwargs = {"similarity_metric": metric}
        if ref is not None and base is not None and ref > base:
            kwargs.update(reference_score=ref, baseline_score=base)
        elif base is not None and base < 1.0:
            kwargs.update(baseline_score=base)
        result = verdict({"steps": steps, "score": det_curve, "similarity": sim_curve}, **kwargs)
        print(result["text"])
    payload = {"steps": steps, "detector_metric": det, "similarity_metric": sim, "detector": det_curve,
               "similarity": sim_curve, "reference_score": ref, "baseline_score": base, "verdict": result}
    out = Path(results_dir) / "curve.json"
    atomic_write(out, json.dumps(payload, indent=2, default=str) + "\n", replace=True)
    print(f"\n  curve and verdict: {out}")
    return 0


def _sibling(metric: Optional[str], columns: list[str], which: str) -> Optional[str]:
    """'Concept score (recovered).rate' -> 'Concept score (original).rate' when that column exists."""
    if not metric or "recovered" not in metric:
        return None
    cand = metric.replace("recovered", which)
    return cand if cand in columns else None


def _mean_over(records: list[dict], metric: Optional[str]) -> Optional[float]:
    if metric is None:
        return None
    vals = [float(r["metrics"][metric]) for r in records if isinstance(r.get("metrics", {}).get(metric), (int, float))]
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _similarity_kind(column: Optional[str]) -> str:
    low = (column or "").lower()
    for kind in ("clip_cosine", "psnr", "ssim"):
        if kind in low:
            return kind
    return "ssim"



# -- the snapshot curve: one training per model and LoRA seed ----------------------------------------------------------
#: labels the curve's jobs carry into the results (which model, which LoRA seed, how many updates)
LABEL_MODEL, LABEL_SEED, LABEL_UPDATES = CURVE_LABELS  # memora_batch.sweep groups the ASR by them
TESTED = "unlearned"  # the model under test: the workflow's 'Unlearned model' (with --models micro: its variant)
LORA_LOADER = "LoraLoaderModelOnly"  # ComfyUI's stock loader: evaluates each snapshot file


def parse_seeds(text: Optional[str]) -> list[Optional[int]]:
    """--lora-seeds '1,2,3' -> [1, 2, 3]; empty: [None] (the workflow's own seed)."""
    if text is None or not str(text).strip():
        return [None]
    try:
        seeds = [int(s) for s in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--lora-seeds {text!r}: expected whole numbers separated by commas, like 1,2,3") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--lora-seeds {text!r}: expected distinct seeds >= 0")
    return seeds


def tested_name(micro: bool) -> str:
    """The curve's name of the workflow's own unlearned model: with --models micro the micro-world variant the
    profile puts in 'Unlearned model' (esd_x), else 'unlearned'."""
    if micro:
        from .profiles import MICRO_VARIANTS

        return MICRO_VARIANTS[TESTED]
    return TESTED


def parse_tested(text: Optional[str]) -> list[str]:
    """--tested 'esd_x,uce' -> ['esd_x', 'uce']; empty: [] (the workflow's own unlearned model)."""
    names = [t.strip() for t in str(text or "").split(",") if t.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"--tested {text!r}: expected distinct model names separated by commas")
    return names


def model_overrides(control: Optional[str], micro: bool, tested: Optional[list[str]] = None) -> list[tuple[str, dict]]:
    """(curve model name, row overrides) for the models under test and, with --control, the control: the same
    workflow with the 'Unlearned model' loader set to each (a micro-world variant, or a checkpoint). Without
    ``tested``: the workflow's own unlearned model (:func:`tested_name`)."""
    address = f"{TITLE_UNLEARNED_MODEL}.variant" if micro else f"{TITLE_UNLEARNED_MODEL}.ckpt_name"
    out = [(name, {address: name}) for name in tested] if tested else [(tested_name(micro), {})]
    if control and control in {name for name, _ in out}:
        raise ValueError(f"--control {control!r} is also a model under test (--tested): the control is measured "
                         f"once, beside the tested models")
    if control:
        out.append((control, {address: control}))
    return out


def training_rows(train_node: str, steps: list[int], seeds: list[Optional[int]], control: Optional[str],
                  micro: bool, snapshots: bool, tested: Optional[list[str]] = None) -> list[dict]:
    """The training jobs: per model and seed, ONE training of max(steps) updates saving snapshots at the other
    budgets (``snapshots``; each snapshot is the LoRA of a separate run on the longest run's schedule), or, as before
    snapshots existed, one training per budget, each on its own schedule (``--no-snapshots``)."""
    rows, top = [], max(steps)
    for name, ov in model_overrides(control, micro, tested):
        for seed in seeds:
            base = {**ov, f"label.{LABEL_MODEL}": name, f"label.{LABEL_SEED}": "workflow" if seed is None else seed}
            if seed is not None:
                base[f"{train_node}.seed"] = seed
            if snapshots:
                rows.append({**base, f"{train_node}.steps": top, f"label.{LABEL_UPDATES}": top,
                             f"{train_node}.snapshot_steps": ",".join(str(s) for s in steps if s != top)})
            else:
                rows += [{**base, f"{train_node}.steps": s, f"label.{LABEL_UPDATES}": s} for s in steps]
    return rows


#: folder (under models/loras) of the curve's training LoRAs: one file prefix per training job
CURVE_SAVE_PREFIX = "memora/curve"


def unique_save_names(rows: list[dict], train_node: str) -> list[dict]:
    """Each training row with its own ``save_name`` (``memora/curve/<model>_seed<seed>_<hash of the row>``): no two
    training jobs share a snapshot file name, so a snapshot named in an evaluation job is the one its training wrote
    (machines number their files on their own: without this, two trainings on two workers would both write
    ``memora/recovered_step25_00001_``)."""
    import hashlib
    import re

    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if k != f"{train_node}.save_name"}
        digest = hashlib.sha1(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:8]
        slug = re.sub(r"[^A-Za-z0-9.-]+", "-", f"{row.get(f'label.{LABEL_MODEL}', 'model')}").strip("-.") or "model"
        seed = row.get(f"label.{LABEL_SEED}", "workflow")
        out.append({**row, f"{train_node}.save_name": f"{CURVE_SAVE_PREFIX}/{slug}_seed{seed}_{digest}"})
    return out


def check_snapshots_reachable(args) -> None:
    """``curve --ray`` with snapshots: each evaluation job loads a snapshot file by name on whichever worker runs it,
    so every worker must see the LoRA folder the trainings wrote to."""
    if getattr(args, "ray", None) and not (getattr(args, "ray_shared_output", False)
                                          and getattr(args, "base_directory", None)):
        raise ValueError("curve --ray: the snapshot evaluation jobs load each training's snapshot LoRA by name on "
                         "whichever worker runs them, so the LoRA folder must be shared by every worker: pass "
                         "--ray-shared-output and one --base-directory on a file system every machine mounts (or "
                         "--no-snapshots: one training per budget, each evaluated where it trained); nothing was run")


def snapshot_rows(records: list[dict], train_node: str) -> list[dict]:
    """The evaluation jobs of the snapshots: each finished training job's row (its sweep values, labels) with the
    'Train LoRA' node replaced by a LoRA loader of one snapshot file (``<save_name>_step<N>_...``)."""
    from memora.lora.recipe import snapshot_step_of

    rows = []
    for r in records:
        if r.get("status") != "ok":
            continue
        base = {k: v for k, v in (r.get("overrides") or {}).items() if not k.startswith(train_node + ".")}
        base.update({f"label.{k}": v for k, v in (r.get("labels") or {}).items()})
        for lora in (r.get("outputs") or {}).get("loras") or []:
            step = snapshot_step_of(lora)
            if step is not None:
                rows.append({**base, f"{train_node}.lora_name": lora, f"label.{LABEL_UPDATES}": step})
    return rows


def loader_profile(train_node: str):
    """A profile edit for the snapshot jobs: the training node becomes ComfyUI's LoRA loader (same MODEL slot 0, its
    'model' input kept), and nothing else addresses the training node's inputs."""
    def edit(profile):
        profile.swaps[train_node] = (LORA_LOADER, {"strength_model": 1.0})
        profile.defaults = {k: v for k, v in profile.defaults.items() if not k.startswith(train_node + ".")}
        return profile
    return edit


def parse_steps(text: str) -> list[int]:
    try:
        steps = sorted({int(s) for s in str(text).split(",") if s.strip()})
    except ValueError:
        steps = []
    if not steps or any(s < 1 for s in steps):
        raise ValueError(f"--steps {text!r}: expected positive integers like 10,50,100,250,500")
    return steps


def run_curve(args, prepare, execute, results_dir_of) -> int:
    """``memora-batch curve``: the training jobs (one per model and LoRA seed, snapshots at every budget), then one
    evaluation job per snapshot file (ComfyUI's LoRA loader in place of the training node), then the statistics and
    the verdict (:func:`report_curve`). ``--no-snapshots``: one training per budget instead (the old way: each budget's
    LoRA on its own learning-rate schedule)."""
    steps, seeds = parse_steps(args.steps), parse_seeds(args.lora_seeds)
    micro, train = args.models == "micro", args.train_node
    snapshots = not args.no_snapshots
    if snapshots and len(steps) > 1:
        check_snapshots_reachable(args)
    rows = training_rows(train, steps, seeds, args.control, micro, snapshots, parse_tested(getattr(args, "tested", None)))
    if args.sweep:  # crossed here (as prepare would) so that each training job gets its own file names
        from . import sweep as _sweep

        rows = [{**r, **e} for r in _sweep.load_rows(args.sweep) or [{}] for e in rows]
    kept = args.sweep
    args.sweep = None
    try:
        backend, plan = prepare(args, args.workflow, unique_save_names(rows, train))
    finally:
        args.sweep = kept
    results_dir = results_dir_of(args, plan.workflow.name + "-curve")
    check_metric_names(plan, {"--detector": args.detector, "--similarity": args.similarity})
    detector = args.detector or (plan.profile.detector_metric if plan.profile else None)
    plans, status = [plan], []

    def report(d):
        status.append(report_curve(d, plans, train, steps, detector, args.similarity, args.control))

    last = not snapshots or len(steps) == 1
    summary = execute(args, backend, plan, results_dir, after=report if last else None)
    if summary is None:
        if snapshots and not last:
            print(f"then: one evaluation job per snapshot file ({len(steps) - 1} per training job), with "
                  f"{train!r} replaced by {LORA_LOADER}")
        return 0
    if not last:
        keys = {j.key for j in plan.jobs}
        records = [r for r in ResultsStore(results_dir).latest() if r["key"] in keys]
        evaluation_rows = snapshot_rows(records, train)
        if evaluation_rows:
            kept = (args.sweep, args.set)
            args.sweep, args.set = None, [s for s in args.set if not s.strip().startswith(train + ".")]
            try:
                backend, plan_b = prepare(args, args.workflow, evaluation_rows, profile_edit=loader_profile(train))
            finally:
                args.sweep, args.set = kept
            plans.append(plan_b)
            more = execute(args, backend, plan_b, results_dir, after=report)
            summary.failed += more.failed
            summary.not_run += more.not_run
        else:
            report(results_dir)
    from .cli import EXIT_JOB_FAILED

    return EXIT_JOB_FAILED if summary.failed or summary.not_run else (status[0] if status else 0)


def _row_identity(record: dict, train_node: str) -> str:
    """What a job evaluates apart from the model and its LoRA (e.g. a prompt CSV row): its other overrides."""
    ov = {k: v for k, v in (record.get("overrides") or {}).items()
          if not k.startswith((train_node + ".", TITLE_UNLEARNED_MODEL + "."))}
    return json.dumps(ov, sort_keys=True, default=str)


def _images(record: dict, job, det: str) -> int:
    """Images behind the detector rate: the score table's n column when it reports one, else the evaluation batch
    (the node titled 'Evaluation image size')."""
    n = record.get("metrics", {}).get(det.rsplit(".", 1)[0] + ".n") if det.endswith(".rate") else None
    if isinstance(n, (int, float)) and n >= 1:
        return int(n)
    from memora.contracts import TITLE_EVALUATION_IMAGE_SIZE

    for node in (job.api.values() if job is not None else []):
        if (node.get("_meta") or {}).get("title") == TITLE_EVALUATION_IMAGE_SIZE:
            size = node.get("inputs", {}).get("batch_size")
            if isinstance(size, int) and size >= 1:
                return size
    raise ValueError(f"cannot count the images behind {det!r}: no '.n' column and no node titled "
                     f"{TITLE_EVALUATION_IMAGE_SIZE!r} with a batch_size")


def _per_image(record: dict, node: Optional[str], column: Optional[str]) -> list[float]:
    for t in record.get("tables") or []:
        if t.get("node") == node and column in (t.get("columns") or []) and len(t.get("rows") or []) > 1:
            j = t["columns"].index(column)
            return [float(r[j]) for r in t["rows"] if j < len(r) and isinstance(r[j], (int, float))]
    v = record.get("metrics", {}).get(f"{node}.{column}")
    return [float(v)] if isinstance(v, (int, float)) and math.isfinite(float(v)) else []


def curve_data(records: list[dict], jobs: dict, train_node: str, steps: list[int], det: str,
               sim: Optional[str], control: str) -> dict:
    """The input of ``memora.evaluation.recovery.analyse`` from the curve's finished jobs: per model and seed,
    [k, n] at 0 updates (the model itself: its 'unlearned' score columns) and at each budget (the recovered model),
    summed over the jobs' other rows (prompts); the similarity per image where the workflow reports it."""
    base_det, orig_det = det.replace("recovered", "unlearned"), det.replace("recovered", "original")
    sim_node, sim_col = (sim.rsplit(".", 1) if sim else (None, None))
    counts: dict = {}
    sims: dict = {}
    zero: dict = {}
    original: dict = {}
    for r in records:
        lab = r.get("labels") or {}
        if r.get("status") != "ok" or LABEL_MODEL not in lab or det not in r.get("metrics", {}):
            continue
        model, seed, u = lab[LABEL_MODEL], str(lab.get(LABEL_SEED)), int(lab[LABEL_UPDATES])
        row, n = _row_identity(r, train_node), _images(r, jobs.get(r["key"]), det)
        m = r["metrics"]
        counts[(model, seed, u, row)] = (round(float(m[det]) * n), n)
        sims.setdefault((model, seed, u), []).extend(_per_image(r, sim_node, sim_col))
        if base_det in m:
            zero[(model, row)] = (round(float(m[base_det]) * n), n)
            sims.setdefault((model, seed, 0, row), _per_image(r, sim_node and sim_node.replace("recovered",
                                                                                               "unlearned"), sim_col))
        if orig_det in m:
            original[row] = (round(float(m[orig_det]) * n), n)
    rows = sorted({k[3] for k in counts})
    conventions = {r.get("metrics", {}).get(det.rsplit(".", 1)[0] + ".convention") for r in records} - {None}
    models: dict = {}
    for model, seed in sorted({(k[0], k[1]) for k in counts}):
        pts = [_summed([zero.get((model, row)) for row in rows])]
        pts += [_summed([counts.get((model, seed, u, row)) for row in rows]) for u in steps]
        entry = models.setdefault(model, {"seeds": {}, "similarity": {}})
        entry["seeds"][seed] = [p for p in pts if p is not None] if None in pts else pts
        entry["similarity"][seed] = [[v for row in rows for v in sims.get((model, seed, 0, row), [])]] + \
            [sims.get((model, seed, u), []) for u in steps]
    return {"updates": [0] + list(steps), "original": _summed([original.get(row) for row in rows]),
            "control": control, "convention": ", ".join(sorted(map(str, conventions))) or det, "models": models}


def _summed(pairs: list) -> Optional[list[int]]:
    if not pairs or any(p is None for p in pairs):
        return None
    return [sum(p[0] for p in pairs), sum(p[1] for p in pairs)]


def report_curve(results_dir, plans: list, train_node: str, steps: list[int], detector: Optional[str],
                 similarity: Optional[str], control: Optional[str]) -> int:
    """Without a control: the curve and the forgetting verdict (:func:`print_verdict`). With one: the statistics
    and the recovery verdict of ``memora.evaluation.recovery`` (docs/evaluation.md, "Recovery verdict"), printed
    and written to curve.json."""
    jobs = {j.key: j for p in plans for j in p.jobs}
    if not control:
        status = print_verdict(results_dir, train_node, steps, detector, similarity)
        _print_rates(results_dir, jobs, train_node, steps, detector, similarity)
        return status
    from memora.evaluation.recovery import analyse

    records = [r for r in ResultsStore(results_dir).latest() if r["key"] in jobs and r.get("status") == "ok"]
    columns = list(dict.fromkeys(k for r in records for k in r.get("metrics", {})))
    det = pick_metric(columns, detector, DETECTOR_HINTS, avoid=("original", "unlearned"))
    sim = pick_metric(columns, similarity, SIMILARITY_HINTS, avoid=("unlearned",))
    if det is None:
        print("\nrecovery curve: no detector metric in the results: give --detector <metric column>")
        return 0
    data = curve_data(records, jobs, train_node, steps, det, sim, control)
    result = analyse(data)
    print(f"\nrecovery curve over {len(records)} finished job(s); detector: {det}; similarity: {sim or '(none)'}")
    print(result["text"])
    out = Path(results_dir) / "curve.json"
    atomic_write(out, json.dumps({"input": data, "analysis": result}, indent=2, default=str) + "\n", replace=True)
    print(f"\n  curve, statistics and verdict: {out}")
    return 0


def _print_rates(results_dir, jobs: dict, train_node: str, steps: list[int], detector: Optional[str],
                 similarity: Optional[str]) -> None:
    """Without a control: each budget's rate with k, n and its Wilson interval, and the similarity's bootstrap
    interval (``memora.evaluation.recovery.describe``), when the records allow counting; nothing otherwise."""
    from memora.evaluation.recovery import CurveError, describe

    records = [r for r in ResultsStore(results_dir).latest() if r["key"] in jobs and r.get("status") == "ok"]
    if not any(LABEL_MODEL in (r.get("labels") or {}) for r in records):
        return
    columns = list(dict.fromkeys(k for r in records for k in r.get("metrics", {})))
    try:
        det = pick_metric(columns, detector, DETECTOR_HINTS, avoid=("original", "unlearned"))
        sim = pick_metric(columns, similarity, SIMILARITY_HINTS, avoid=("unlearned",))
        if det is None:
            return
        text = describe(curve_data(records, jobs, train_node, steps, det, sim, ""))["text"]
    except (CurveError, ValueError) as e:
        print(f"\n  (no per-budget intervals: {e})")
        return
    print(f"\nper budget, with intervals:\n{text}")
