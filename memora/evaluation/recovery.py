"""The recovery verdict: how fast a concept comes back under LoRA training, measured against a never-learned control.

A *recovery curve* is measured at LoRA update budgets ``updates`` (e.g. 0, 25, 50, 100, 200, 400; 0 = the model
itself) for several LoRA training seeds: at each budget and seed, ``k`` of ``n`` evaluation images show the concept.
The same curve is measured on the *control*: a model that never learned the concept, run through the same MemoRa
procedure (its own inversion, regeneration and training, the same seeds and evaluation). A model whose forgetting
hides a residual memory recovers faster and further than the control; a model that never learned the concept (or
lost it for good) recovers only what training on the regenerated images teaches from scratch, like the control.

Per model this module reports (statistics from :mod:`memora.evaluation.stats`, the pack's one implementation):

- per budget: the rate pooled over seeds (k, n, Wilson 95 % interval), each seed's rate, the mean similarity to the
  original with its bootstrap interval (when given), and the one-sided Fisher exact p-value of "this model's rate >
  the control's rate" at the same budget (pooled counts);
- the recovery-speed figures, each per seed with a bootstrap 95 % interval over seeds:
  ``half_updates``: updates to reach half of the original model's rate, linearly interpolated between budgets (a
  seed that never reaches it within the last budget is *censored*: the mean and interval are then not given, the
  number of seeds that reached it is); ``auc``: the area under the rate-over-updates curve (trapezoids) divided by
  (last budget - first budget) x the original's rate: 1.0 = the original's rate at every budget, 0 = never seen;
- the verdict (:data:`RULE`, written down in docs/evaluation.md, "Recovery verdict").

API::

    from memora.evaluation.recovery import analyse
    a = analyse({"updates": [0, 25, 50], "original": {"k": 28, "n": 32}, "control": "never_learned",
                 "models": {"unlearned": {"seeds": {"1": [[0, 32], [15, 32], [17, 32]]}},
                            "never_learned": {"seeds": {"1": [[0, 32], [2, 32], [3, 32]]}}}})
    a["models"]["unlearned"]["verdict"]   # "short-term" | "long-term" | "nothing to recover" | "inconclusive"
                                          # | "not erased" | "control"
    a["models"]["unlearned"]["vs_control"]  # model - control of half_updates and auc, bootstrap interval over seeds
    a["text"]                             # the report
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from . import stats

SHORT_TERM = "short-term"
LONG_TERM = "long-term"
NOTHING = "nothing to recover"
CONTROL = "control"
INCONCLUSIVE = "inconclusive"
NOT_ERASED = "not erased"


@dataclass(frozen=True)
class Rule:
    """The verdict's settings (docs/evaluation.md, "Recovery verdict")."""

    alpha: float = 0.05          # family-wise significance over the budgets > 0 (Bonferroni: alpha / m per budget)
    quick_updates: int = 100     # short-term: half of the original's rate reached with confidence within this budget
    half: float = 0.5            # "recovered" = this share of the original model's rate

    def check(self) -> "Rule":
        if not (0 < float(self.alpha) < 1):
            raise ValueError(f"alpha must be between 0 and 1, got {self.alpha!r}")
        if isinstance(self.quick_updates, bool) or not isinstance(self.quick_updates, int) or self.quick_updates < 1:
            raise ValueError(f"quick_updates must be a whole number >= 1, got {self.quick_updates!r}")
        if not (0 < float(self.half) <= 1):
            raise ValueError(f"half must be in (0, 1], got {self.half!r}")
        return self


RULE = ("not erased: at 0 updates (the model itself) the Wilson lower bound of its rate is already >= half x the "
        "original's rate; nothing was forgotten, so nothing is judged. Otherwise, against the never-learned control "
        "measured with the same budgets, seeds and evaluation: at each budget > 0 a one-sided Fisher exact test of 'model rate > control rate' (counts pooled over seeds), significant at "
        "alpha / m (Bonferroni over the m budgets > 0). nothing to recover: no budget significant (within the "
        "largest budget the model recovers no more than a model that never learned the concept). short-term: some "
        "budget is significant AND at some budget 0 < u <= quick_updates the Wilson lower bound of the pooled rate is >= "
        "half x the original's rate (the concept is back, at 95 % confidence, within the quick budget). long-term: "
        "significant somewhere, but not back with confidence within the quick budget (later, or only partly). "
        "inconclusive: significant, not back yet, and the largest budget tested is below the quick budget. The Wilson "
        "'back' check is made at each budget <= quick_updates without a multiplicity correction (each at 95 %).")


class CurveError(ValueError):
    """A recovery curve that cannot be analysed (what is wrong and what is expected)."""


# -- input checking ------------------------------------------------------------------------------------------------
def _counts(x: Any, where: str) -> tuple[int, int]:
    if isinstance(x, Mapping):
        x = (x.get("k"), x.get("n"))
    if not isinstance(x, (list, tuple)) or len(x) != 2:
        raise CurveError(f"{where}: expected [k, n] (images showing the concept, images evaluated), got {x!r}")
    try:
        return stats._check_counts(x[0], x[1], where)
    except stats.StatsInputError as e:
        raise CurveError(str(e)) from None


def check_updates(updates: Sequence[Any]) -> list[int]:
    try:
        u = [int(x) for x in updates]
    except (TypeError, ValueError):
        raise CurveError(f"updates: expected whole numbers of LoRA updates, got {list(updates)!r}") from None
    if len(u) < 2 or any(x < 0 for x in u) or any(b <= a for a, b in zip(u, u[1:])):
        raise CurveError(f"updates: expected at least 2 increasing budgets >= 0 (e.g. [0, 25, 50, 100]), got {u}")
    return u


def check_seeds(name: str, seeds: Any, n_points: int) -> dict[str, list[tuple[int, int]]]:
    """{seed: [(k, n) per budget]}; CurveError when a seed's curve has another length than the budgets."""
    if not isinstance(seeds, Mapping) or not seeds:
        raise CurveError(f"model {name!r}: expected 'seeds': {{seed: [[k, n] per budget]}} with at least one seed")
    out = {}
    for seed, points in seeds.items():
        if not isinstance(points, (list, tuple)) or len(points) != n_points:
            got = len(points) if isinstance(points, (list, tuple)) else type(points).__name__
            raise CurveError(f"model {name!r}, seed {seed}: {got} points, but the curve has {n_points} budgets; every "
                             f"seed needs one [k, n] per budget (rerun the missing points, or drop the seed)")
        out[str(seed)] = [_counts(p, f"model {name!r}, seed {seed}, point {i}") for i, p in enumerate(points)]
    return out


# -- the figures ---------------------------------------------------------------------------------------------------
def half_updates(updates: Sequence[int], rates: Sequence[float], target: float) -> Optional[float]:
    """The first update count where the curve reaches ``target``, linearly interpolated between budgets (None:
    never within the last budget; the first budget when it already reaches it)."""
    for i, r in enumerate(rates):
        if r >= target - 1e-12:
            if i == 0:
                return float(updates[0])
            r0, u0, u1 = rates[i - 1], updates[i - 1], updates[i]
            return float(u0 + (target - r0) / (r - r0) * (u1 - u0))
    return None


def normalised_auc(updates: Sequence[int], rates: Sequence[float], original_rate: float) -> float:
    """Area under the rate curve over [first, last budget] / ((last - first) x original_rate)."""
    area = float(np.trapezoid(rates, updates)) if hasattr(np, "trapezoid") else float(np.trapz(rates, updates))
    return area / ((updates[-1] - updates[0]) * original_rate)


def _over_seeds(values: list[Optional[float]]) -> dict:
    """A figure over seeds: each seed's value, and the mean with its bootstrap interval when every seed has one."""
    reached = [v for v in values if v is not None]
    rec: dict = {"per_seed": values, "seeds": len(values), "reached": len(reached)}
    if len(reached) == len(values):
        rec.update(stats.mean_record(reached))
    else:
        rec.update({"n": len(values), "mean": None, "ci_low": None, "ci_high": None})
    return rec


def model_curve(updates: list[int], seeds: dict, original_rate: float, convention: str,
                similarity: Optional[Mapping] = None, half: float = 0.5) -> dict:
    """Per budget: pooled rate record, each seed's rate and the similarity record; the speed figures over seeds."""
    points = []
    for i, u in enumerate(updates):
        k = sum(seeds[s][i][0] for s in seeds)
        n = sum(seeds[s][i][1] for s in seeds)
        if u == 0 and len({seeds[s][i] for s in seeds}) == 1:
            k, n = seeds[next(iter(seeds))][i]  # 0 updates: one model, evaluated alike for every seed: counted once
        p = {"updates": u, "rate": stats.rate_record(k, n, convention),
             "seed_rates": {s: seeds[s][i][0] / seeds[s][i][1] for s in seeds}}
        sims = [float(v) for s in (similarity or {}) for v in (similarity[s][i] or [])]
        if sims:
            p["similarity"] = stats.mean_record(sims)
        points.append(p)
    target = original_rate * half
    per_seed_rates = {s: [k / n for k, n in seeds[s]] for s in seeds}
    return {"points": points,
            "half_updates": _over_seeds([half_updates(updates, r, target) for r in per_seed_rates.values()]),
            "auc": _over_seeds([normalised_auc(updates, r, original_rate) for r in per_seed_rates.values()])}


# -- the verdict ---------------------------------------------------------------------------------------------------
def judge(name: str, curve: dict, control: dict, updates: list[int], original_rate: float, rule: Rule) -> dict:
    """Fisher p-values against the control at each budget (stored in the points) and the verdict with its reason."""
    m = sum(1 for u in updates if u > 0)
    level = rule.alpha / max(m, 1)
    significant = []
    for p, c in zip(curve["points"], control["points"]):
        a, b = p["rate"], c["rate"]
        p["fisher_p"] = stats.fisher_greater(a["k"], a["n"], b["k"], b["n"])
        p["significant"] = p["updates"] > 0 and p["fisher_p"] < level
        if p["significant"]:
            significant.append(p["updates"])
    target = rule.half * original_rate
    back = [p["updates"] for p in curve["points"]
            if 0 < p["updates"] <= rule.quick_updates and p["rate"]["ci_low"] >= target - 1e-12]
    curve["significance_level"] = level
    start = curve["points"][0]
    if start["updates"] == 0 and start["rate"]["ci_low"] >= target - 1e-12:
        verdict, reason = NOT_ERASED, (f"the model itself (0 updates) already shows the concept: Wilson lower bound "
                                       f"{start['rate']['ci_low']:.3f} >= {rule.half:g} x the original's "
                                       f"{original_rate:.3f}; nothing to judge")
    elif not significant:
        best = min((p for p in curve["points"] if p["updates"] > 0), key=lambda q: q["fisher_p"])
        verdict, reason = NOTHING, (f"no budget recovers significantly more than the control (smallest p "
                                    f"{best['fisher_p']:.3g} at {best['updates']} updates >= {level:.3g})")
    elif back:
        verdict, reason = SHORT_TERM, (f"back at {back[0]} updates (<= {rule.quick_updates}): Wilson lower bound "
                                       f"{_rate_at(curve, back[0])['ci_low']:.3f} >= {rule.half:g} x the original's "
                                       f"{original_rate:.3f}; above the control at {significant}")
    elif updates[-1] < rule.quick_updates:
        verdict, reason = INCONCLUSIVE, (f"above the control at {significant} updates and not back with confidence "
                                         f"(Wilson lower bound >= {target:.3f}) so far, but the budgets tested stop at "
                                         f"{updates[-1]} < quick_updates {rule.quick_updates}: test up to "
                                         f"{rule.quick_updates} to tell short-term from long-term")
    else:
        verdict, reason = LONG_TERM, (f"above the control at {significant} updates, but not back with confidence "
                                      f"(Wilson lower bound >= {target:.3f}) within {rule.quick_updates} updates")
    curve.update({"verdict": verdict, "reason": reason, "significant_at": significant})
    return curve


def speed_difference(model: dict, control: dict) -> dict:
    """A speed figure of a model minus the control's (same seeds, paired per seed): the mean difference with its
    bootstrap interval over seeds (:func:`stats.paired_difference_record`); no mean when a seed of either model is
    censored (never reached half), the count of such seeds then given."""
    pairs = list(zip(model["per_seed"], control["per_seed"]))
    censored = sum(1 for a, b in pairs if a is None or b is None)
    rec: dict = {"seeds": len(pairs), "censored": censored}
    if censored:
        rec.update({"n": len(pairs), "mean": None, "ci_low": None, "ci_high": None})
    else:
        rec.update(stats.paired_difference_record([a for a, _ in pairs], [b for _, b in pairs]))
    return rec


def _rate_at(curve: dict, u: int) -> dict:
    return next(p["rate"] for p in curve["points"] if p["updates"] == u)


def _original(data: Mapping) -> tuple[int, int]:
    ok, on = _counts(data.get("original"), "original (the original model's [k, n])")
    if ok == 0:
        raise CurveError("original: the original model never shows the concept (k = 0): there is nothing to recover "
                         "to; check the detector and the prompt")
    return ok, on


def describe(data: Mapping, half: float = 0.5) -> dict:
    """The per-budget statistics and speed figures of every model of ``data`` (as :func:`analyse` takes it, the
    control optional), without a verdict: for a curve measured without a control."""
    updates = check_updates(data.get("updates") or [])
    ok, on = _original(data)
    convention = str(data.get("convention") or "detector")
    models = {name: model_curve(updates, check_seeds(name, (m or {}).get("seeds"), len(updates)), ok / on,
                                convention, (m or {}).get("similarity"), half)
              for name, m in (data.get("models") or {}).items()}
    for c in models.values():
        c["verdict"] = CONTROL  # no comparison: the report shows no p-values
    out = {"updates": updates, "original": stats.rate_record(ok, on, convention), "control": None,
           "rule": "(no control: no Fisher test and no recovery verdict)", "models": models}
    out["text"] = report(out).replace(": CONTROL", "")
    return out


def analyse(data: Mapping, rule: Optional[Rule] = None) -> dict:
    """Every model's curve with its statistics, figures and verdict (the module docstring gives the input form).

    CurveError when the curve cannot be judged: budgets not increasing, a seed with another number of points than
    the budgets, no control (or a control missing from ``models``), the control measured with other seeds."""
    rule = (rule or Rule()).check()
    if not isinstance(data, Mapping):
        raise CurveError(f"expected a mapping with 'updates', 'original', 'models', 'control'; got "
                         f"{type(data).__name__}")
    updates = check_updates(data.get("updates") or [])
    ok, on = _original(data)
    original = ok / on
    models = data.get("models")
    if not isinstance(models, Mapping) or not models:
        raise CurveError("models: expected {name: {'seeds': {seed: [[k, n] per budget]}}} with at least one model")
    control_name = data.get("control")
    if not control_name or control_name not in models:
        raise CurveError(f"no control curve: the verdict compares each model with a never-learned control measured "
                         f"the same way; name it in 'control' (one of {sorted(models)}), got {control_name!r}")
    convention = str(data.get("convention") or "detector")
    curves, seed_sets = {}, {}
    for name, m in models.items():
        seeds = check_seeds(name, (m or {}).get("seeds"), len(updates))
        seed_sets[name] = sorted(seeds)
        curves[name] = model_curve(updates, seeds, original, convention, (m or {}).get("similarity"), rule.half)
    for name in curves:
        if seed_sets[name] != seed_sets[control_name]:
            raise CurveError(f"model {name!r} was measured with seeds {seed_sets[name]}, the control "
                             f"{control_name!r} with {seed_sets[control_name]}: compare like with like")
    for name, curve in curves.items():
        judge(name, curve, curves[control_name], updates, original, rule)
        if name == control_name:
            curve["verdict"] = CONTROL
        else:
            curve["vs_control"] = {f: speed_difference(curve[f], curves[control_name][f])
                                   for f in ("half_updates", "auc")}
    out = {"updates": updates, "original": stats.rate_record(ok, on, convention), "control": control_name,
           "rule": RULE, "settings": asdict(rule), "models": curves}
    out["text"] = report(out)
    return out


def _fig(rec: dict, digits: int = 3) -> str:
    if rec["mean"] is None:
        return f"not reached by {rec['seeds'] - rec['reached']} of {rec['seeds']} seeds"
    return stats.format_mean(rec, digits)


def _diff(rec: dict, digits: int) -> str:
    if rec["mean"] is None:
        return f"not given ({rec['censored']} of {rec['seeds']} seeds never reached half)"
    return stats.format_mean(rec, digits)


def _sim(rec: Optional[dict]) -> str:
    if not rec:
        return "-"
    if rec["ci_low"] is None:
        return f"{rec['mean']:.3f} (n={rec['n']})"
    return f"{rec['mean']:.3f} ({rec['ci_low']:.3f}-{rec['ci_high']:.3f})"


def report(a: dict) -> str:
    """The analysis as text: per model a table of budgets (pooled rate with n and interval, seed spread, similarity,
    Fisher p against the control), the two speed figures, the verdict and its reason; then the rule."""
    lines = [f"original model: {stats.format_rate(a['original'])}", f"control: {a['control']}; rates are "
             f"pooled over seeds (k/n), 'seeds' is the range of the seeds' own rates"]
    for name, c in a["models"].items():
        lines.append(f"\n{name}: {c['verdict'].upper()}" + ("" if c["verdict"] == CONTROL else f" ({c['reason']})"))
        lines.append(f"  {'updates':>7}  {'rate':>5}  {'k/n':>9}  {'95% CI':>11}  {'seeds':>9}  "
                     f"{'similarity (95% CI)':>24}  {'p vs control':>12}")
        for p in c["points"]:
            r = p["rate"]
            lo, hi = min(p["seed_rates"].values()), max(p["seed_rates"].values())
            sim = _sim(p.get("similarity"))
            pv = "-" if c["verdict"] == CONTROL or p["updates"] == 0 else f"{p['fisher_p']:.3g}"
            lines.append(f"  {p['updates']:>7}  {r['rate']:>5.3f}  {r['k']:>4}/{r['n']:<4}  "
                         f"{r['ci_low']:.3f}-{r['ci_high']:.3f}  {lo:.2f}-{hi:.2f}  {sim:>24}  {pv:>12}")
        lines.append(f"  updates to half of the original's rate: {_fig(c['half_updates'], 1)}")
        lines.append(f"  normalised area under the curve: {_fig(c['auc'])}")
        for f, what, d in (("half_updates", "updates to half", 1), ("auc", "area", 3)):
            if "vs_control" in c:
                lines.append(f"  {what}, model - control (paired over seeds): {_diff(c['vs_control'][f], d)}")
    lines.append(f"\nrule: {a['rule']}")
    return "\n".join(lines)
