"""``memora-batch scoreboard``: every recovery attack on one unlearned model and one concept, in one table.

Each attack is a workflow of example_workflows/ (memora_batch/attacks.py names them) run by the batch machinery
(the same backends, results folder, resume and reports as ``run``); every job carries the labels ``attack`` and
``model``. The table (scoreboard.csv / .json / .md, and a chart in report.html) gives per attack and model: the
attacked images' concept rate with k, n, its Wilson interval and the convention it was counted by; the similarity
of those images to the original model's (mean, bootstrap interval); the cost (the attack's wall seconds, the UNet's
forward and backward calls, the concept images it needed) and the attacker's knowledge tier; and a one-sided
Fisher exact test of the rate against the no-attack baseline (docs/attacks.md)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Optional

from memora.contracts import (TITLE_EVALUATION_IMAGE_SIZE, TITLE_TRAIN_LORA, TITLE_UNLEARNED_MODEL,
                              evaluate_title)
from memora.evaluation import stats
from memora.fileio import atomic_write

from . import attacks as A
from .results import ResultsStore

LABEL_ATTACK, LABEL_MODEL = "attack", "model"
TESTED = "unlearned"
FILES = ("scoreboard.csv", "scoreboard.json", "scoreboard.md")
COLUMNS = ["attack", "model", "knowledge", "k", "n", "rate", "ci_low", "ci_high", "convention", "fisher_p",
           "similarity", "similarity_mean", "similarity_ci_low", "similarity_ci_high", "seconds", "seconds_of",
           "forward_calls", "backward_calls", "concept_images", "job"]
#: UNet calls of the pack's own attack nodes, counted from their settings as the attack nodes count theirs (one
#: call of the model on a batch = 1): (forward, backward) per node
NODE_CALLS = {
    "MemoRaDDIMInversion": lambda i: (i.get("start_at_step", 0) * (1 + i.get("refine_iterations", 0)), 0),
    "MemoRaRegenerate": lambda i: (max(i.get("steps", 0) - i.get("start_at_step", 0), 0), 0),
    "MemoRaLoRATrain": lambda i: (i.get("steps", 0) * i.get("gradient_accumulation", 1)
                                  * (2 if i.get("gradient_checkpointing") else 1),
                                  i.get("steps", 0) * i.get("gradient_accumulation", 1)),
}
#: node types whose time is the attack's (besides the nodes publishing a cost table)
ATTACK_NODE_TYPES = tuple(NODE_CALLS) + ("MemoRaSlerpLatents", "MemoRaMultiLoRAMerge")


class ScoreboardError(ValueError):
    """Inputs the scoreboard cannot run with (an unknown attack, a control without an attack that uses it, ...)."""


# -- the jobs --------------------------------------------------------------------------------------------------------
def workflow_path(attack: A.Attack, root: Optional[Path]) -> Optional[Path]:
    path = (root / "example_workflows" / f"{attack.workflow}.json") if root else None
    return path if path is not None and path.is_file() else None


def micro_concepts(variant: Optional[str]) -> tuple[list[str], list[str]]:
    """(the erased concepts of a micro-world variant, the concepts it kept), by memora.micro.world."""
    from memora.micro import world

    manifest = world.load_manifest()
    erased_of = getattr(world, "erased_concepts", None)  # micro world v2
    if erased_of is not None and variant:
        erased = list(erased_of(variant, manifest))
    else:
        erased = [manifest.get("erased_concept", world.ERASED_CONCEPT)]
    return erased, [c for c in world.CONCEPTS if c not in erased]


def attack_rows(attack: A.Attack, args) -> tuple[list[dict], Optional[str]]:
    """The sweep rows of one attack (labels attack/model, the tested model, the control where the attack runs on
    it, the texts the attack needs), or ([], why it is skipped)."""
    from .curve import model_overrides

    micro = args.models == "micro"
    base = {f"label.{LABEL_ATTACK}": attack.name}
    if micro and args.variant:
        base[f"{TITLE_UNLEARNED_MODEL}.variant"] = args.variant
    if attack.name == "concept resurgence":
        kept = args.kept_concept
        if kept is None and micro:
            from memora.micro.data import caption

            kept = caption(micro_concepts(args.variant)[1][0])
        if kept is not None:
            base[f"{A.TITLE_KEPT_PROMPT}.value"] = kept
    if attack.name == "textual inversion" and micro:  # the token starts from a word the micro CLIP knows
        base["Textual inversion.init_word"] = "shape"
    if attack.name == "concept vector" and micro:  # the prompts without the concept: the kept concepts'
        from memora.micro.data import caption

        base[f"{A.TITLE_NEUTRAL_PROMPT}.value"] = caption(micro_concepts(args.variant)[1][0])
    if attack.multi:
        other = args.other_concept
        if other is None and micro:
            from memora.micro.data import caption

            erased = micro_concepts(args.variant)[0]
            other = caption(erased[1]) if len(erased) > 1 else None
        if other is None:
            return [], ("the model has one erased concept (Multi-MemoRa needs several: give --other-concept with "
                        "the prompt of another concept the model erased)")
        base[f"{A.TITLE_OTHER_PROMPT}.value"] = other
    rows = [{**base, f"label.{LABEL_MODEL}": TESTED}]
    if attack.on_control and args.control:
        for name, ov in model_overrides(args.control, micro)[1:]:
            rows.append({**base, **ov, f"label.{LABEL_MODEL}": name})
    return rows, None


def scaled_settings(titles: set, args) -> dict:
    """--eval-steps / --eval-images / --train-steps / --attack-steps, addressed to the titles this workflow has."""
    out = {}
    wanted = {
        "eval_steps": [f"{evaluate_title(m)}.steps" for m in ("original", "unlearned", "recovered")]
        + [f"{A.TITLE_AUTO_SCHEDULE}.steps", "Noise-injection probe.steps", "Inpainting probe.steps"],
        "eval_images": [f"{TITLE_EVALUATION_IMAGE_SIZE}.batch_size"],
        "train_steps": [f"{TITLE_TRAIN_LORA}.steps", f"{A.TITLE_TRAIN_OTHER}.steps"],
        "attack_steps": ["Textual inversion.steps", "Adversarial prompt.steps"],
    }
    for option, addresses in wanted.items():
        value = getattr(args, option, None)
        if value is None:
            continue
        for address in addresses:
            if address.rsplit(".", 1)[0] in titles:
                out[address] = str(value)
    return out


def workflow_titles(path: Path) -> set:
    from .workflow import Workflow

    wf = Workflow.load(str(path))
    if wf.api is not None:
        return {str((n.get("_meta") or {}).get("title")) for n in wf.api.values() if isinstance(n, dict)}
    return {str(n.get("title")) for n in (wf.ui or {}).get("nodes", []) if isinstance(n, dict) and n.get("title")}


def profile_edit_for(titles: set, micro: bool):
    """The model profile for one attack workflow: what the profile sets on titles this workflow lacks (a training
    in the baseline, ...) is listed as 'not in this workflow'; on the micro world the AutoMemoRa sampler draws as
    the other evaluations (DDIM)."""
    def edit(profile):
        if micro:
            profile.defaults.update({f"{A.TITLE_AUTO_SAMPLER}.sampler_name": "ddim",
                                     f"{A.TITLE_AUTO_SCHEDULE}.scheduler": "ddim_uniform"})
        named = [t for t in profile.swaps] + [a.rsplit(".", 1)[0] for a in profile.defaults] + list(profile.texts)
        absent = {t for t in named if not (t.endswith("*") and any(x.startswith(t[:-1]) for x in titles))
                  and t not in titles}
        profile.optional_titles = frozenset(profile.optional_titles | absent)
        return profile
    return edit


def run_scoreboard(args, prepare, execute, results_dir_of, root: Optional[Path]) -> int:
    """Plan and run every attack (a plan per attack workflow, one results folder), then write the scoreboard."""
    chosen = A.resolve(args.attacks)
    if args.control and not any(a.on_control for a in chosen):
        raise ScoreboardError(f"--control {args.control!r}: none of the chosen attacks runs on the control (direct "
                              f"relearning does); add it to --attacks or leave --control out")
    results_dir = results_dir_of(args, "scoreboard")
    plans, skipped, status = [], [], {"failed": 0}
    user_sets = list(args.set)
    for attack in chosen:
        path = workflow_path(attack, root)
        if path is None:
            skipped.append((attack.name, f"example_workflows/{attack.workflow}.json not found (written by "
                                         f"scripts/make_attack_workflows.py when its nodes are installed)"))
            continue
        rows, why = attack_rows(attack, args)
        if why:
            skipped.append((attack.name, why))
            continue
        plan_backend = _plan_one(args, prepare, attack, path, rows, user_sets, skipped)
        if plan_backend is None:
            continue
        backend, plan = plan_backend
        plans.append(plan)
        summary = execute(args, backend, plan, results_dir,
                          after=lambda d: write_scoreboard(d, plans, skipped, args.dry_run))
        if summary is not None:
            status["failed"] += summary.failed + summary.not_run
    args.set = user_sets
    for name, why in skipped:
        print(f"memora-batch scoreboard: skipped {name!r}: {why}")
    if args.dry_run:
        return 0
    if plans:
        print_scoreboard(results_dir)
    from .cli import EXIT_JOB_FAILED

    return EXIT_JOB_FAILED if status["failed"] else 0


def _plan_one(args, prepare, attack: A.Attack, path: Path, rows: list[dict], user_sets: list[str], skipped: list):
    """(backend, plan) of one attack, or None with the reason in ``skipped`` (its node types are not installed)."""
    from .workflow import MissingNodeTypes

    titles = workflow_titles(path)
    sets = []
    for item in user_sets:
        address = item.split("=", 1)[0].strip()
        if address.rsplit(".", 1)[0] in titles:
            sets.append(item)
        else:
            print(f"memora-batch scoreboard: --set {address}: {attack.workflow} has no node titled "
                  f"{address.rsplit('.', 1)[0]!r}; not set for {attack.name!r}")
    sets += [f"{a}={v}" for a, v in scaled_settings(titles, args).items()]
    args.set = sets
    try:
        return prepare(args, str(path), rows, profile_edit=profile_edit_for(titles, args.models == "micro"))
    except MissingNodeTypes as e:
        skipped.append((attack.name, f"node type(s) {', '.join(sorted(e.missing))} not installed where the jobs "
                                     f"run (a pack without this attack)"))
        return None


# -- the table -------------------------------------------------------------------------------------------------------
def _cost_tables(rec: dict) -> list[list]:
    """The one-row cost tables the job's attack nodes published (title '<node>: cost'), as dicts by column."""
    out = []
    for t in rec.get("tables") or []:
        rows, cols = t.get("rows") or [], t.get("columns") or []
        if str(t.get("title", "")).endswith(A.COST_SUFFIX) and len(rows) == 1:
            out.append({"node": t.get("node"), **dict(zip(cols, rows[0]))})
    return out


def cost_of(rec: dict, job, attack: A.Attack) -> dict:
    """seconds (of the attack's nodes where the run timed nodes, else the whole job), forward / backward UNet calls
    (the attack nodes' cost tables plus the pack's MemoRa nodes counted from their settings), concept images and
    the knowledge tier (a cost table's, else the attack's)."""
    tables = _cost_tables(rec)
    fwd = sum(int(t.get("forward_calls") or 0) for t in tables)
    bwd = sum(int(t.get("backward_calls") or 0) for t in tables)
    attack_titles = {t["node"] for t in tables}
    for nid, node in (job.api.items() if job is not None else []):
        rule = NODE_CALLS.get(node.get("class_type"))
        if node.get("class_type") in ATTACK_NODE_TYPES:
            attack_titles.add(job.titles.get(nid, nid))
        if rule is not None:
            inputs = {k: v for k, v in node.get("inputs", {}).items() if not isinstance(v, list)}
            f, b = rule(inputs)
            fwd, bwd = fwd + int(f), bwd + int(b)
    timed = rec.get("node_seconds")
    if isinstance(timed, dict):
        seconds, of = sum(float(v) for t, v in timed.items() if t in attack_titles), "attack nodes"
        reused = sorted(attack_titles & set(rec.get("cached_nodes") or []))
        if not attack_titles:
            of = "no attack node"
        elif reused:  # computed by an earlier job of the run (ComfyUI's cache): their time is not in this job's
            of = f"attack nodes; {len(reused)} reused from an earlier job"
    else:
        seconds, of = float(rec.get("seconds") or 0.0), "whole job"
    images = [int(t.get("concept_images") or 0) for t in tables]
    tiers = [str(t.get("knowledge")) for t in tables if t.get("knowledge") in A.TIERS]
    return {"seconds": round(seconds, 3), "seconds_of": of, "forward_calls": fwd, "backward_calls": bwd,
            "concept_images": max(images) if images else attack.concept_images,
            "knowledge": min(tiers, key=A.TIERS.index) if tiers else attack.knowledge}


def _row(rec: dict, job, attack: A.Attack, detector: Optional[str]) -> dict:
    from .report import rate_of, similarity_of

    rate = rate_of(rec, "recovered", detector) or {}
    if rate.get("n"):  # the interval from k and n (the node's table rounds its own)
        rate = stats.rate_record(rate["k"], rate["n"], rate["convention"])
    sim = similarity_of(rec, "recovered") or {}
    row = {"attack": attack.name, "model": (rec.get("labels") or {}).get(LABEL_MODEL, TESTED), "job": rec["key"],
           "k": rate.get("k"), "n": rate.get("n"), "rate": rate.get("rate"), "ci_low": rate.get("ci_low"),
           "ci_high": rate.get("ci_high"), "convention": rate.get("convention"),
           "similarity": sim.get("metric"), "similarity_mean": sim.get("mean"),
           "similarity_ci_low": sim.get("ci_low"), "similarity_ci_high": sim.get("ci_high")}
    row.update(cost_of(rec, job, attack))
    return row


def scoreboard_rows(records: list[dict], jobs: dict, detector: Optional[str]) -> list[dict]:
    """One row per (attack, model) from the latest ok record of each; the Fisher test against the baseline."""
    latest: dict = {}
    for r in records:
        lab = r.get("labels") or {}
        if r.get("status") == "ok" and lab.get(LABEL_ATTACK) in A.BY_NAME:
            latest[(lab[LABEL_ATTACK], lab.get(LABEL_MODEL, TESTED))] = r
    order = {a.name: i for i, a in enumerate(A.ATTACKS)}
    rows = [_row(r, jobs.get(r["key"]), A.BY_NAME[a], detector)
            for (a, m), r in sorted(latest.items(), key=lambda x: (order[x[0][0]], x[0][1] != TESTED, x[0][1]))]
    base = next((r for r in rows if r["attack"] == A.BASELINE and r["model"] == TESTED and r["n"]), None)
    for r in rows:
        r["fisher_p"] = None
        if base is not None and r is not base and r["n"] and r["k"] is not None:
            r["fisher_p"] = stats.fisher_greater(r["k"], r["n"], base["k"], base["n"])
    return rows


def markdown(rows: list[dict], skipped: list, title: str = "Recovery attacks") -> str:
    """The scoreboard as a Markdown table (what docs/attacks.md's matrix and scoreboard.md show)."""
    head = ("| attack | model | knowledge | recovered rate (k/n, 95% CI) | convention | Fisher p vs no attack | "
            "similarity to original | seconds | UNet fwd / bwd | concept images |")
    lines = [f"# {title}", "", head, "|" + "---|" * 10]
    for r in rows:
        rate = (f"{r['rate']:.3f} ({r['k']}/{r['n']}; {r['ci_low']:.3f}-{r['ci_high']:.3f})" if r["n"] else
                "(no rate)")
        sim = (f"{r['similarity']} {r['similarity_mean']:.3f}" + (f" ({r['similarity_ci_low']:.3f}-"
               f"{r['similarity_ci_high']:.3f})" if r["similarity_ci_low"] is not None else "")
               if r["similarity_mean"] is not None else "")
        p = "-" if r["attack"] == A.BASELINE else (f"{r['fisher_p']:.3g}" if r["fisher_p"] is not None else "")
        lines.append(f"| {r['attack']} | {r['model']} | {r['knowledge']} | {rate} | {r['convention'] or ''} | {p} | "
                     f"{sim} | {r['seconds']:.1f} ({r['seconds_of']}) | {r['forward_calls']} / "
                     f"{r['backward_calls']} | {r['concept_images']} |")
    if skipped:
        lines += [""] + [f"- skipped {name}: {why}" for name, why in skipped]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return buf.getvalue()


def write_scoreboard(results_dir, plans: list, skipped: list, dry_run: bool = False) -> list[Path]:
    """scoreboard.csv / .json / .md from every finished job of the results folder (the chosen attacks' plans)."""
    if dry_run:
        return []
    results_dir = Path(results_dir)
    jobs = {j.key: j for p in plans for j in p.jobs}
    detector = next((p.profile.detector_metric for p in plans if p.profile and p.profile.detector_metric), None)
    records = [r for r in ResultsStore(results_dir).latest() if r["key"] in jobs]
    rows = scoreboard_rows(records, jobs, detector)
    payload = {"columns": COLUMNS, "rows": rows, "skipped": [{"attack": a, "why": w} for a, w in skipped],
               "baseline": A.BASELINE, "tiers": list(A.TIERS),
               "test": "one-sided Fisher exact test: attack rate > no-attack rate (stats.fisher_greater)",
               "interval": "Wilson 95% (rates), bootstrap percentile 95% (similarity)"}
    out = [results_dir / f for f in FILES]
    atomic_write(out[0], csv_text(rows), replace=True)
    atomic_write(out[1], json.dumps(payload, indent=2, default=str) + "\n", replace=True)
    atomic_write(out[2], markdown(rows, skipped), replace=True)
    return out


def print_scoreboard(results_dir) -> None:
    path = Path(results_dir) / "scoreboard.md"
    if path.is_file():
        print(path.read_text(encoding="utf-8"))
        print(f"  scoreboard: {path} (and scoreboard.csv, scoreboard.json; chart in report.html)")
    else:
        print("memora-batch scoreboard: no attack finished; see results.csv", file=sys.stderr)


# -- the chart (report.html) -----------------------------------------------------------------------------------------
def chart(rows: list[dict]):
    """A matplotlib figure: one horizontal bar per (attack, model) with its rate and Wilson 95 % whiskers, the
    no-attack rate as a dashed line, the knowledge tier and cost in each label; None without rates."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("n")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8.0, 0.42 * len(rows) + 1.4))
    y = list(range(len(rows)))[::-1]
    rates = [r["rate"] for r in rows]
    err = [[r["rate"] - r["ci_low"] for r in rows], [r["ci_high"] - r["rate"] for r in rows]]
    colors = ["#999999" if r["attack"] == A.BASELINE else "#c44e52" if r["model"] != TESTED else "#4c72b0"
              for r in rows]
    ax.barh(y, rates, xerr=err, capsize=3, color=colors)
    labels = [f"{r['attack']}" + (f" [{r['model']}]" if r["model"] != TESTED else "")
              + f"\n{r['knowledge']}; {r['forward_calls']} fwd, {r['seconds']:.0f} s" for r in rows]
    ax.set_yticks(y, labels, fontsize=7)
    base = next((r for r in rows if r["attack"] == A.BASELINE and r["model"] == TESTED), None)
    if base is not None:
        ax.axvline(base["rate"], color="#555555", linestyle="--", linewidth=1, label="no attack")
        ax.legend(fontsize=7, loc="lower right")
    for yi, r in zip(y, rows):
        if r.get("fisher_p") is not None and r["fisher_p"] < 0.05:
            ax.text(min(r["ci_high"] + 0.02, 0.98), yi, "*", va="center", fontsize=10)
    ax.set_xlim(0, 1.05)
    convs = sorted({str(r.get("convention")) for r in rows})
    ax.set_xlabel(f"recovered rate ({', '.join(convs)}); whiskers: Wilson 95% interval; *: Fisher p < 0.05 vs no "
                  f"attack", fontsize=8)
    ax.set_title("Recovery attacks", fontsize=10)
    fig.tight_layout()
    return fig


def html_section(results_dir) -> Optional[str]:
    """report.html's scoreboard section (the chart and the table), when the folder holds scoreboard.json."""
    import html as _html

    path = Path(results_dir) / "scoreboard.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    from .report_html import _img, _png

    rows = data.get("rows") or []
    fig = chart(rows)
    parts = ["<h2>Recovery attacks (scoreboard)</h2>"]
    if fig is not None:
        parts.append(_img(_png(fig), "scoreboard chart", "Recovered rate per attack with its Wilson 95% interval; "
                                                          "dashed: the no-attack baseline (scoreboard.csv)."))
    text = markdown(rows, [(s["attack"], s["why"]) for s in data.get("skipped") or []])
    parts.append("<pre>" + _html.escape(text) + "</pre>")
    return "\n".join(parts)
