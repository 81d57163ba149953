"""The tables of docs/micro-world-results.md from the results folders of scripts/micro_world_results.py.

:func:`collect` reads the units' memora-batch results into counts (k of n images per point, per model and seed);
:func:`build` turns the counts into every table (statistics from memora.evaluation.stats, verdicts from
memora.evaluation.recovery); :func:`write_page` writes the page, its JSON and the plot. ``build`` needs nothing but
the collected dictionary, so the tests check it on a stored --quick run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from scipy import stats as sps

from memora.evaluation import recovery, stats

TRAIN = "Train LoRA"
DETECTOR = "Concept score (recovered).{c}.rate"
CONVENTION = "micro-top1"
CONTROL = "never_learned"
TESTED = "esd_x"
ERASED_CONCEPT = "star"


def erased_of(variant: str) -> tuple[str, ...]:
    from memora.micro import world

    return tuple(world.erased_concepts(variant)) if variant != "original" else ()


# -- collecting the counts ------------------------------------------------------------------------------------------
def _records(folder: Path) -> list[dict]:
    from memora_batch.results import ResultsStore

    if not (folder / "results.jsonl").exists():
        return []
    return [r for r in ResultsStore(folder).latest() if r.get("status") == "ok"]


def _curve_counts(folder: Path, updates: list[int], concept: str) -> Optional[dict]:
    """memora_batch.curve.curve_data of one results folder for one concept's detector rate."""
    from memora_batch import curve

    recs = _records(folder)
    if not recs:
        return None
    columns = list(dict.fromkeys(k for r in recs for k in r.get("metrics", {})))
    sim = curve.pick_metric(columns, None, curve.SIMILARITY_HINTS, avoid=("unlearned",))
    return curve.curve_data(recs, {}, TRAIN, list(updates), DETECTOR.format(c=concept), sim, CONTROL)


def _merge(into: dict, data: Optional[dict], rename: Optional[str] = None) -> None:
    if not data:
        return
    into.setdefault("original", data["original"])
    for name, m in data["models"].items():
        entry = into.setdefault("models", {}).setdefault(rename or name, {"seeds": {}, "similarity": {}})
        entry["seeds"].update(m["seeds"])
        entry["similarity"].update(m["similarity"])


def detector_counts(files: list[str], concept: str) -> list[int]:
    """[k, n]: images (PNG files) whose micro-world detector top class is ``concept``."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from memora.micro import detector as det
    from memora.micro import world

    net = det.from_state_dict(load_file(str(world.weight_path("detector"))))
    x = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files]))
    top = det.probabilities(net, det.prepare(x)).argmax(dim=-1)
    return [int((top == det.DETECTOR_CLASSES.index(concept)).sum()), len(files)]


def _files(record: dict, node: str) -> list[str]:
    return list((record.get("outputs") or {}).get("files_by_node", {}).get(node) or [])


def collect_auto(out: Path, seeds: list[int], updates: list[int]) -> dict:
    """{'w=1': {'seeds': {seed: [[k, n] at 0 and each budget]}}} from the AutoMemoRa runs."""
    models: dict = {}
    for s in seeds:
        recs = _records(out / "auto" / f"seed{s}" / "run")
        if not recs:
            continue
        zero = detector_counts(_files(recs[0], "Save unlearned images"), ERASED_CONCEPT)
        by = {(float(r["labels"]["w"]), int(r["labels"]["updates"])): r for r in recs}
        for w in sorted({k[0] for k in by}):
            pts = [zero] + [detector_counts(_files(by[(w, u)], "Save automemora images"), ERASED_CONCEPT)
                            for u in updates if (w, u) in by]
            if len(pts) == len(updates) + 1:
                models.setdefault(f"w={w:g}", {"seeds": {}})["seeds"][str(s)] = pts
    return models


def collect_multi(out: Path, seeds: list[int]) -> dict:
    """{config: {concept: {seed: [k, n]}}} from the Multi-MemoRa runs."""
    res: dict = {}
    for s in seeds:
        for r in _records(out / "multi" / f"seed{s}" / "run"):
            lab = r["labels"]
            counts = detector_counts(_files(r, "Save recovered images"), lab["concept"])
            res.setdefault(lab["config"], {}).setdefault(lab["concept"], {})[str(s)] = counts
    return res


def unit_folders(part: Path) -> list[Path]:
    """The units' folders of one part (``<name>-seed<n>``), not those set aside as stale (``.stale-<time>``)."""
    return sorted(f for f in part.glob("*-seed*") if f.is_dir() and ".stale-" not in f.name)


def collect(cfg, parts: list[str]) -> dict:
    """Every count the page shows, from the results folders under ``cfg.out``."""
    out, updates = Path(cfg.out), list(cfg.updates)
    data: dict = {"updates": [0] + updates, "control": CONTROL, "convention": CONVENTION, "curves": {},
                  "kept": {}, "ablations": {}, "auto": {}, "multi": {}, "images": {}}
    for folder in unit_folders(out / "curves"):
        _merge(data["curves"], _curve_counts(folder / "curve", updates, ERASED_CONCEPT))
        for kept in sorted(folder.glob("kept-*")):
            concept = kept.name[len("kept-"):]
            _merge(data["kept"].setdefault(concept, {}), _curve_counts(kept, updates, concept))
    if "ablations" in parts:
        for folder in unit_folders(out / "ablations"):
            slug, value = folder.name.rsplit("-seed", 1)[0].rsplit("-", 1)
            knob_value = f"{slug.replace('_', ' ')} = {value}"
            _merge(data["ablations"], _curve_counts(folder / "curve", updates, ERASED_CONCEPT), rename=knob_value)
    if "auto" in parts:
        data["auto"] = collect_auto(out, cfg.seeds, updates)
    if "multi" in parts:
        data["multi"] = collect_multi(out, cfg.seeds)
    data["images"] = example_images(out, cfg.seeds[0])
    return data


def example_images(out: Path, seed: int) -> dict:
    """Files for the contact sheets: ESD-x's regenerated training set and its recovered images at the last budget."""
    recs = _records(out / "curves" / f"{TESTED}-seed{seed}" / "curve")
    train = [r for r in recs if f"{TRAIN}.snapshot_steps" in (r.get("overrides") or {})]
    if not train:
        return {}
    return {"regenerated": _files(train[0], "Save regenerated images"),
            "recovered": _files(train[0], "Save recovered images"), "original": _files(train[0],
                                                                                      "Save original images")}


# -- the tables -----------------------------------------------------------------------------------------------------
def _curve_input(data: dict, models: dict, original=None) -> dict:
    return {"updates": data["updates"], "original": original or data["curves"]["original"], "control": CONTROL,
            "convention": CONVENTION, "models": models}


def _best(curve: dict) -> dict:
    """The point (updates > 0) with the highest pooled rate."""
    return max((p for p in curve["points"] if p["updates"] > 0), key=lambda p: p["rate"]["rate"])


def strength(analysis: dict, auto: Optional[dict], original: dict) -> dict:
    """Recovery strength on ESD-x: the best pooled rate of MemoRa and of AutoMemoRa (any w) within the last budget,
    as a share of the original's rate (the interval: the rate's Wilson interval / the original's rate)."""
    cands = {"MemoRa": _best(analysis["models"][TESTED])}
    for name, c in ((auto or {}).get("models") or {}).items():
        cands[f"AutoMemoRa {name}"] = _best(c)
    rows = []
    for method, p in cands.items():
        r = p["rate"]
        share = {k: r[k] / original["rate"] for k in ("rate", "ci_low", "ci_high")}
        rows.append({"method": method, "updates": p["updates"], "rate": r, "share": share})
    best = max(rows, key=lambda x: x["rate"]["rate"])
    met = best["share"]["rate"] >= 0.7 and best["share"]["ci_low"] >= 0.5
    return {"rows": rows, "best": best["method"], "target_met": met,
            "target": ">= 70 % of the original's rate with the interval's lower bound >= 50 %, within the last budget"}


def multi_table(multi: dict, original: dict) -> dict:
    """Per configuration and concept the rate pooled over seeds; the interference = each single LoRA's rate minus the
    merge's, with the one-sided Fisher p of 'single > merge'."""
    conv = CONVENTION
    rates = {cfg: {c: stats.rate_record(sum(v[0] for v in seeds.values()), sum(v[1] for v in seeds.values()), conv)
                   for c, seeds in by.items()} for cfg, by in multi.items()}
    singles = {"star": "star LoRA alone", "cross": "cross LoRA alone"}
    interference = []
    for cfg in (c for c in rates if c.startswith("merged")):
        for concept, single in singles.items():
            a, b = rates.get(single, {}).get(concept), rates[cfg].get(concept)
            if a and b:
                interference.append({"merge": cfg, "concept": concept, "single": a["rate"], "merged": b["rate"],
                                     "lost": a["rate"] - b["rate"],
                                     "p_single_greater": stats.fisher_greater(a["k"], a["n"], b["k"], b["n"])})
    return {"rates": rates, "interference": interference, "original": original}


def _seeds_only(model: dict, seeds) -> dict:
    return {k: ({s: v for s, v in d.items() if s in seeds} if k in ("seeds", "similarity") else d)
            for k, d in model.items()}


def ablation_table(data: dict, analysis: dict) -> dict:
    """Every ablation's curve analysed against the control, beside the default setting (the curves' ESD-x), each
    with the default and the control restricted to the ablation's own LoRA seeds (like with like: an ablation
    measured with fewer seeds than the curves is compared on those seeds); the two-sided Fisher p of 'rate differs
    from the default's' at the last budget and at the default's best budget (on the same seeds)."""
    default, control = data["curves"]["models"][TESTED], data["curves"]["models"][CONTROL]
    name_default = f"default ({TESTED})"
    out = {"updates": analysis["updates"], "models": {}}
    whole = recovery.analyse(_curve_input(data, {name_default: default, CONTROL: control}))
    out["models"][name_default] = {**whole["models"][name_default], "seeds_used": sorted(default["seeds"])}
    for name, m in data["ablations"]["models"].items():
        seeds = set(m["seeds"])
        a = recovery.analyse(_curve_input(data, {name_default: _seeds_only(default, seeds),
                                                 CONTROL: _seeds_only(control, seeds), name: m}))
        res, d = a["models"][name], a["models"][name_default]
        best_u = _best(d)["updates"]
        for key, u in (("p_vs_default_last", a["updates"][-1]), ("p_vs_default_best", best_u)):
            r = next(p["rate"] for p in res["points"] if p["updates"] == u)
            r0 = next(p["rate"] for p in d["points"] if p["updates"] == u)
            table = [[r["k"], r["n"] - r["k"]], [r0["k"], r0["n"] - r0["k"]]]
            res[key] = float(sps.fisher_exact(table, alternative="two-sided").pvalue)
        res["default_best_updates"] = best_u
        res["seeds_used"] = sorted(seeds)
        out["models"][name] = res
    return out


def build(data: dict) -> dict:
    """Every table of the page from the collected counts (JSON-ready); the parts not measured are None."""
    curves = data["curves"].get("models") or {}
    analysis = recovery.analyse(_curve_input(data, curves)) if CONTROL in curves and len(curves) > 1 else None
    kept = {}
    for concept, d in data["kept"].items():
        if d.get("models") and d["original"][0] > 0:
            kept[concept] = recovery.describe(_curve_input(data, d["models"], d["original"]))
    auto = recovery.describe(_curve_input(data, data["auto"])) if data.get("auto") and analysis else None
    original = analysis["original"] if analysis else None
    multi = data.get("multi")
    if not (analysis or multi):
        raise ValueError("no results to report: run the curves part (with the control) or the multi part first")
    return {"run": data.get("run"), "updates": data["updates"], "convention": CONVENTION, "curves": analysis,
            "kept": kept, "auto": auto, "strength": strength(analysis, auto, original) if analysis else None,
            "multi": multi_table(multi, {ERASED_CONCEPT: original, **{c: k["original"] for c, k in kept.items()}})
            if multi else None,
            "ablations": ablation_table(data, analysis) if data.get("ablations") and analysis else None,
            "images": data.get("images") or {},
            "counts": {k: data[k] for k in ("curves", "kept", "auto", "multi", "ablations")}}


# -- the page -------------------------------------------------------------------------------------------------------
def _r(rec: Optional[dict]) -> str:
    if not rec:
        return "-"
    return f"{rec['rate']:.3f} ({rec['k']}/{rec['n']}; {rec['ci_low']:.3f}-{rec['ci_high']:.3f})"


def _m(rec: Optional[dict], digits: int = 3) -> str:
    if not rec or rec.get("mean") is None:
        return "-" if not rec else f"not reached by {rec['seeds'] - rec['reached']} of {rec['seeds']} seeds"
    if rec["ci_low"] is None:
        return f"{rec['mean']:.{digits}f} (n={rec['n']})"
    return f"{rec['mean']:.{digits}f} ({rec['ci_low']:.{digits}f}-{rec['ci_high']:.{digits}f}, n={rec['n']})"


def _p(v) -> str:
    return "-" if v is None else f"{v:.2g}"


def curve_lines(name: str, c: dict, kept: dict) -> list[str]:
    heads = ["LoRA updates", "erased-concept rate (k/n; 95 % CI)", "seeds' rates", "p vs control (one-sided)"]
    heads += [f"kept: {k} rate (k/n; CI)" for k in kept] + ["SSIM to original (95 % CI)"]
    lines = [f"**{name}**: {c['verdict']}" + (f" ({c['reason']})" if c.get("reason") else ""), "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for i, p in enumerate(c["points"]):
        sr = sorted(p["seed_rates"].values())
        cells = [str(p["updates"]), _r(p["rate"]), f"{sr[0]:.2f}-{sr[-1]:.2f}",
                 "-" if c["verdict"] == recovery.CONTROL or p["updates"] == 0 else _p(p.get("fisher_p"))]
        cells += [_r(k["models"][name]["points"][i]["rate"]) if name in k["models"] else "-" for k in kept.values()]
        lines.append("| " + " | ".join(cells + [_m(p.get("similarity"))]) + " |")
    return lines + [""]


def summary_lines(a: dict) -> list[str]:
    lines = ["| model | verdict | updates to half (mean over seeds, 95 % CI) | normalised AUC (95 % CI) | "
             "updates to half - control's | AUC - control's |", "|---|---|---|---|---|---|"]
    for name, c in a["models"].items():
        vs = c.get("vs_control") or {}
        lines.append(f"| {name} | {c['verdict']} | {_m(c['half_updates'], 1)} | {_m(c['auc'])} | "
                     f"{_diff(vs.get('half_updates'), 1)} | {_diff(vs.get('auc'), 3)} |")
    return lines + [""]


def _diff(rec: Optional[dict], digits: int) -> str:
    if not rec:
        return "-"
    if rec.get("mean") is None:
        return f"not given ({rec['censored']} of {rec['seeds']} seeds censored)"
    return _m(rec, digits)


def auto_lines(auto: dict) -> list[str]:
    models = auto["models"]
    updates = [p["updates"] for p in next(iter(models.values()))["points"]]
    lines = ["| w | " + " | ".join(f"{u} updates" for u in updates) + " | updates to half (95 % CI) | AUC |",
             "|" + "---|" * (len(updates) + 3)]
    for name, c in models.items():
        lines.append(f"| {name[2:]} | " + " | ".join(_r(p["rate"]) for p in c["points"]) +
                     f" | {_m(c['half_updates'], 1)} | {_m(c['auc'])} |")
    return lines + [""]


def multi_lines(m: dict) -> list[str]:
    lines = ["| LoRA(s) applied to esd_x_star_cross | star rate (k/n; 95 % CI) | cross rate (k/n; 95 % CI) |",
             "|---|---|---|"]
    orig = {c: r for c, r in (m.get("original") or {}).items() if r}
    if orig:
        lines.append(f"| (the original model, no LoRA) | {_r(orig.get('star'))} | {_r(orig.get('cross'))} |")
    lines += [f"| {cfg} | {_r(by.get('star'))} | {_r(by.get('cross'))} |" for cfg, by in m["rates"].items()]
    lines += ["", "| merge | concept | single LoRA's rate | merge's rate | lost by merging | p (single > merge) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {i['merge']} | {i['concept']} | {i['single']:.3f} | {i['merged']:.3f} | {i['lost']:+.3f} | "
              f"{_p(i['p_single_greater'])} |" for i in m["interference"]]
    return lines + [""]


def ablation_lines(a: dict) -> list[str]:
    last = a["updates"][-1]
    lines = [f"| setting | LoRA seeds | rate at {last} updates (k/n; 95 % CI) | best rate (updates) | updates to half "
             f"(95 % CI) | AUC (95 % CI) | p vs default at {last} / at the default's best budget (two-sided, same "
             f"seeds) | verdict |", "|---|---|---|---|---|---|---|---|"]
    for name, c in a["models"].items():
        best = _best(c)
        ps = "-" if c.get("p_vs_default_last") is None else \
            f"{_p(c['p_vs_default_last'])} / {_p(c['p_vs_default_best'])} ({c['default_best_updates']})"
        lines.append(f"| {name} | {', '.join(map(str, c.get('seeds_used', [])))} | {_r(c['points'][-1]['rate'])} | "
                     f"{_r(best['rate'])} ({best['updates']}) | {_m(c['half_updates'], 1)} | {_m(c['auc'])} | {ps} | "
                     f"{c['verdict']} |")
    return lines + [""]


def page(b: dict) -> str:
    run = b.get("run") or {}
    s = run.get("settings") or {}
    n_note = (f"n = images per point pooled over {len(s.get('seeds', []))} LoRA seed(s) ({s.get('images')} per seed "
              f"and point; at 0 updates one evaluation of the model itself); rate = share of images whose detector "
              f"top class is the prompted concept (convention {CONVENTION}); 95 % Wilson intervals; SSIM, speed "
              f"figures: bootstrap 95 % intervals (over images, over seeds)")
    lr = f"lr {s['lora_learning_rate']:g}" if s.get("lora_learning_rate") else "lr not recorded"
    out = ["# Micro world: recovery evidence (generated)", "",
           f"Generated by `{run.get('command', 'python scripts/micro_world_results.py')}` in "
           f"{run.get('wall_seconds', 0):.0f} s wall on {run.get('machine', 'this machine')}. Do not edit: rerun it "
           f"(docs/micro-world.md, \"Recovery evidence\", says how, and how to run the same on real models). "
           f"Settings: LoRA budgets {b['updates'][1:]} updates (one training per model and seed, snapshots), seeds "
           f"{s.get('seeds')}, {s.get('images')} evaluation images per point, DDIM {s.get('sample_steps')} steps, "
           f"cfg 7.5, evaluation seed 1; MemoRa as in example_workflows/memora_recovery_micro.json (reference seed "
           f"pairs, inversion to step 15 of 50, 33 slerped latents, LoRA rank 4, {lr} cosine over the largest "
           f"budget, batch 4). "
           f"{'QUICK RUN: a few images and one seed, not evidence.' if s.get('quick') else ''}", ""]
    if b.get("curves"):
        out += curves_section(b, n_note)
    if b.get("auto"):
        out += ["## AutoMemoRa (ESD-x)", "", "eps = eps_unlearned + w (eps_LoRA - eps_unlearned) on the curves' ESD-x "
                "LoRAs (w = 1: the plain LoRA); `memora-batch run example_workflows/automemora.json --models micro`; the "
                "workflow has no score node, so its saved PNGs are scored by the same detector (micro-top1). "
                + n_note + ".", "", *auto_lines(b["auto"])]
    if b.get("multi"):
        out += ["## Multi-MemoRa (esd_x_star_cross: star and cross erased)", "", "One LoRA per concept "
                "(`memora-batch run example_workflows/multi_memora.json --models micro`), merged by MemoRa Multi-LoRA "
                "Merge; concat is exact, so it is the same model as both LoRAs stacked. The saved PNGs scored by the "
                "detector (the workflow has no score node). Rates pooled over seeds; "
                + n_note + ".", "", *multi_lines(b["multi"])]
    if b.get("ablations"):
        out += ["## Ablations (ESD-x)", "", "One knob changed at a time from the default (inversion start 15 of 50, "
                "11 slerp points per pair, 6 seed images, rank 4); each analysed against the control like the "
                "variants. " + n_note + ". Two seed images are not measured: the workflow's seed nodes make 3 pairs.",
                "", *ablation_lines(b["ablations"])]
    return "\n".join(out) + "\n"


def curves_section(b: dict, n_note: str) -> list[str]:
    a = b["curves"]
    out = [f"Original model's star rate: **{stats.format_rate(a['original'])}**. {n_note}.", "",
           "## Recovery verdicts (docs/evaluation.md, \"Recovery verdict\")", "", *summary_lines(a),
           f"Rule: {a['rule']}", "", "![recovery curves with 95 % intervals](img/micro-world-curves.png)", "",
           "## Curves per variant", "", f"Control: {CONTROL}. {n_note}.", ""]
    for name, c in a["models"].items():
        out += curve_lines(name, c, b["kept"])
    st = b["strength"]
    out += ["## Recovery strength on ESD-x", "", f"Target: {st['target']}. Met: **{'yes' if st['target_met'] else 'no'}**"
            f" (best: {st['best']}).", "", "| method | best point (updates) | rate (k/n; 95 % CI) | share of the "
            "original's rate (interval / original's rate) |", "|---|---|---|---|"]
    out += [f"| {r['method']} | {r['updates']} | {_r(r['rate'])} | {r['share']['rate']:.2f} "
            f"({r['share']['ci_low']:.2f}-{r['share']['ci_high']:.2f}) |" for r in st["rows"]]
    if not st["target_met"] and b.get("images", {}).get("regenerated"):
        out += ["", "Below the target: ESD-x's regenerated training set (what the LoRA learns from) and the images of "
                "the recovered model at the last budget (seed 1):", "",
                "![regenerated training set](img/micro-world-regenerated-esd_x.png)",
                "![recovered model](img/micro-world-recovered-esd_x.png)"]
    return out + [""]


def plot(b: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("erased concept (star) by variant", b["curves"]["models"])]
    if b.get("auto"):
        panels.append(("AutoMemoRa on ESD-x", b["auto"]["models"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    orig = b["curves"]["original"]["rate"]
    for ax, (title, models) in zip(axes[0], panels):
        for name, c in models.items():
            u = [p["updates"] for p in c["points"]]
            r = [p["rate"] for p in c["points"]]
            line, = ax.plot(u, [x["rate"] for x in r], marker="o", label=name,
                            linestyle="--" if name == CONTROL else "-")
            ax.fill_between(u, [x["ci_low"] for x in r], [x["ci_high"] for x in r], alpha=0.15,
                            color=line.get_color())
        ax.axhline(orig, color="k", linewidth=0.8, label="original")
        ax.axhline(orig / 2, color="k", linewidth=0.6, linestyle=":", label="half of the original")
        ax.set(title=title, xlabel="LoRA updates", ylabel=f"rate ({CONVENTION}), 95 % Wilson band", ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def contact_sheet(files: list[str], path: Path, columns: int = 16) -> None:
    import numpy as np
    from PIL import Image

    ims = [np.asarray(Image.open(f).convert("RGB")) for f in files[:64]]
    if not ims:
        return
    h, w, _ = ims[0].shape
    rows = (len(ims) + columns - 1) // columns
    sheet = np.full((rows * h, columns * w, 3), 255, dtype=np.uint8)
    for i, im in enumerate(ims):
        sheet[(i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w] = im
    Image.fromarray(sheet).resize((columns * w * 2, rows * h * 2), Image.NEAREST).save(path)


def write_page(b: dict, docs: Path) -> None:
    from memora.fileio import atomic_write

    docs.mkdir(parents=True, exist_ok=True)
    if b.get("curves"):
        plot(b, docs / "img" / "micro-world-curves.png")
    if b.get("strength") and not b["strength"]["target_met"]:
        contact_sheet(b["images"].get("regenerated") or [], docs / "img" / "micro-world-regenerated-esd_x.png")
        contact_sheet(b["images"].get("recovered") or [], docs / "img" / "micro-world-recovered-esd_x.png")
    kept = {k: v for k, v in b.items() if k != "images"}  # image paths of this machine stay out
    atomic_write(docs / "micro-world-results.json", json.dumps(kept, indent=1, default=str) + "\n", replace=True)
    atomic_write(docs / "micro-world-results.md", page(b), replace=True)


# -- the time estimate ----------------------------------------------------------------------------------------------
def estimate_parts(tiny_dir: Path, tiny, cfg, parts: list[str], todo: list) -> dict:
    """Each part's wall time from a tiny curve's job times: a training job = the MemoRa pipeline (seed images,
    inversion, regeneration) + updates + 3 evaluations; a snapshot job = 1 evaluation (the original's and the
    unlearned model's are cached between the jobs of one process). Evaluation cost scales with images x steps,
    training with updates (both linearly: an estimate, not a measurement)."""
    recs = _records(tiny_dir)
    train = [r["seconds"] for r in recs if f"{TRAIN}.snapshot_steps" in (r.get("overrides") or {})]
    snap = [r["seconds"] for r in recs if f"{TRAIN}.lora_name" in (r.get("overrides") or {})]
    if not train or not snap:
        raise RuntimeError(f"the tiny run left no timed jobs in {tiny_dir}")
    per_eval = snap[0] / (tiny.images * tiny.sample_steps)              # seconds per image-step (one model)
    upd = max(tiny.updates)
    pipeline = max(train[0] - 3 * snap[0], 0.0)                         # pipeline + tiny training
    scale = cfg.images * cfg.sample_steps * per_eval
    top, n_snap = max(cfg.updates), len(cfg.updates) - 1
    per_curve = pipeline + (top / upd) * 0.25 * pipeline + 3 * scale + n_snap * scale
    kept = len(cfg.kept) * (len(cfg.updates) * scale + 2 * scale)
    cost = {"curve": per_curve, "auto": len(cfg.updates) * 3 * 2 * scale, "multi": 2 * per_curve + 8 * scale}
    parts_s: dict = {}
    for u in todo:
        s = cost[u.kind] + (kept if u.part == "curves" else 0)
        parts_s[u.part] = parts_s.get(u.part, 0.0) + s
    return {"tiny": {"training_job_s": train[0], "snapshot_job_s": snap[0], "images": tiny.images,
                     "sample_steps": tiny.sample_steps, "updates": upd},
            "cpu_seconds": parts_s, "jobs": cfg.jobs, "units": len(todo)}


def print_estimate(e: dict) -> int:
    t = e["tiny"]
    print(f"tiny run: training job {t['training_job_s']:.0f} s ({t['updates']} updates, {t['images']} images x "
          f"DDIM {t['sample_steps']}), snapshot job {t['snapshot_job_s']:.0f} s")
    total = 0.0
    for part, s in e["cpu_seconds"].items():
        total += s
        print(f"  {part}: ~{s / 60:.0f} min of one process")
    print(f"  all: ~{total / 60:.0f} min in one process, ~{total / 60 / e['jobs']:.0f} min wall with --jobs "
          f"{e['jobs']} ({e['units']} units; on a machine with at least {e['jobs']} free cores)")
    return 0
