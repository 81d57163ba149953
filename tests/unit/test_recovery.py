"""memora.evaluation.recovery: the recovery-speed figures and the recovery verdict on constructed curves with
known answers, and the specific errors for curves that cannot be judged."""

from __future__ import annotations

import pytest
from scipy import stats as sps

from memora.evaluation import recovery as RV

UPDATES = [0, 25, 50, 100]


def _data(model, control, seeds=("1", "2", "3"), original=(45, 50), **extra):
    return {"updates": UPDATES, "original": list(original), "control": "never_learned", "convention": "test",
            "models": {"unlearned": {"seeds": {s: model for s in seeds}},
                       "never_learned": {"seeds": {s: control for s in seeds}}}, **extra}


FAST = [[0, 50], [30, 50], [40, 50], [45, 50]]
SLOW = [[0, 50], [5, 50], [10, 50], [20, 50]]
FLAT = [[0, 50], [1, 50], [2, 50], [3, 50]]


def test_half_updates_interpolates_between_budgets():
    assert RV.half_updates(UPDATES, [0.0, 0.2, 0.6, 0.8], 0.4) == pytest.approx(37.5)
    assert RV.half_updates(UPDATES, [0.5, 0.6, 0.7, 0.8], 0.4) == 0.0
    assert RV.half_updates(UPDATES, [0.0, 0.1, 0.2, 0.3], 0.4) is None
    assert RV.half_updates(UPDATES, [0.0, 0.4, 0.1, 0.9], 0.4) == pytest.approx(25.0)  # the FIRST crossing


def test_normalised_auc_known_areas():
    assert RV.normalised_auc([0, 100], [0.0, 1.0], 1.0) == pytest.approx(0.5)
    assert RV.normalised_auc([0, 50, 100], [0.0, 0.5, 0.5], 0.5) == pytest.approx((12.5 + 25) / 50)
    assert RV.normalised_auc([10, 20], [0.9, 0.9], 0.9) == pytest.approx(1.0)


def test_short_term_model_against_a_flat_control():
    a = RV.analyse(_data(FAST, FLAT))
    u = a["models"]["unlearned"]
    assert u["verdict"] == RV.SHORT_TERM and "back at 25 updates" in u["reason"]
    assert u["significant_at"] == [25, 50, 100]
    p25 = u["points"][1]
    assert (p25["rate"]["k"], p25["rate"]["n"], p25["rate"]["rate"]) == (90, 150, 0.6)
    lo, hi = sps.binomtest(90, 150).proportion_ci(method="wilson")
    assert p25["rate"]["ci_low"] == pytest.approx(lo) and p25["rate"]["ci_high"] == pytest.approx(hi)
    assert p25["fisher_p"] == pytest.approx(
        sps.fisher_exact([[90, 60], [3, 147]], alternative="greater").pvalue)
    assert u["significance_level"] == pytest.approx(0.05 / 3)
    # every seed reaches 0.45 (half of 0.9) at 0 + 0.45 / 0.6 * 25 updates
    assert u["half_updates"]["per_seed"] == pytest.approx([18.75] * 3)
    assert u["half_updates"]["mean"] == pytest.approx(18.75)
    auc = (25 * 0.3 + 25 * 0.7 + 50 * 0.85) / (100 * 0.9)
    assert u["auc"]["mean"] == pytest.approx(auc)
    c = a["models"]["never_learned"]
    assert c["verdict"] == RV.CONTROL and c["half_updates"]["reached"] == 0 and c["half_updates"]["mean"] is None
    assert "SHORT-TERM" in a["text"] and "not reached by 3 of 3 seeds" in a["text"]


def test_long_term_when_significant_but_not_back_with_confidence():
    u = RV.analyse(_data(SLOW, FLAT))["models"]["unlearned"]
    assert u["verdict"] == RV.LONG_TERM
    assert u["significant_at"] == [25, 50, 100]  # 15/150 vs 3/150: p = 0.003 < 0.05 / 3
    assert u["points"][3]["rate"]["ci_low"] < 0.45  # 60/150 = 0.4: not back with confidence


def test_never_learned_model_has_nothing_to_recover():
    data = _data(FLAT, FLAT)
    data["models"]["never_learned_again"] = {"seeds": {s: FLAT for s in ("1", "2", "3")}}
    a = RV.analyse(data)
    for name in ("unlearned", "never_learned_again"):
        assert a["models"][name]["verdict"] == RV.NOTHING
        assert all(p["fisher_p"] > 0.4 for p in a["models"][name]["points"])


def test_a_quick_recovery_beyond_the_quick_budget_is_long_term():
    late = [[0, 50], [0, 50], [1, 50], [45, 50]]
    u = RV.analyse(_data(late, FLAT), RV.Rule(quick_updates=50))["models"]["unlearned"]
    assert u["verdict"] == RV.LONG_TERM
    assert RV.analyse(_data(late, FLAT))["models"]["unlearned"]["verdict"] == RV.SHORT_TERM


def test_seed_spread_and_bootstrap_interval_over_seeds():
    data = _data(FAST, FLAT)
    data["models"]["unlearned"]["seeds"] = {"1": FAST, "2": SLOW, "3": [[0, 50], [20, 50], [30, 50], [40, 50]]}
    u = RV.analyse(data)["models"]["unlearned"]
    per = u["auc"]["per_seed"]
    assert u["auc"]["mean"] == pytest.approx(sum(per) / 3)
    assert u["auc"]["ci_low"] <= u["auc"]["mean"] <= u["auc"]["ci_high"]
    assert min(per) <= u["auc"]["ci_low"] and u["auc"]["ci_high"] <= max(per)
    assert u["points"][1]["seed_rates"] == {"1": 0.6, "2": 0.1, "3": 0.4}
    # seed 2 never reaches 0.45: the figure is censored, not averaged
    assert u["half_updates"]["reached"] == 2 and u["half_updates"]["mean"] is None


def test_similarity_means_come_with_a_bootstrap_interval():
    data = _data(FAST, FLAT)
    data["models"]["unlearned"]["similarity"] = {s: [[0.2, 0.3], [0.5, 0.7], [0.6, 0.6], [0.7, 0.9]]
                                                 for s in ("1", "2", "3")}
    u = RV.analyse(data)["models"]["unlearned"]
    sim = u["points"][1]["similarity"]
    assert sim["n"] == 6 and sim["mean"] == pytest.approx(0.6) and sim["ci_low"] < 0.6 < sim["ci_high"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["models"]["unlearned"]["seeds"].__setitem__("2", FAST[:3]),
     r"model 'unlearned', seed 2: 3 points, but the curve has 4 budgets"),
    (lambda d: d.pop("control"), "no control curve"),
    (lambda d: d.__setitem__("control", "esd_u"), r"no control curve.*got 'esd_u'"),
    (lambda d: d["models"].pop("never_learned"), "no control curve"),
    (lambda d: d["models"]["unlearned"]["seeds"].pop("3"), r"seeds \['1', '2'\], the control 'never_learned' with"),
    (lambda d: d.__setitem__("updates", [0, 50, 25, 100]), "increasing budgets"),
    (lambda d: d.__setitem__("original", [0, 50]), "never shows the concept"),
    (lambda d: d["models"]["unlearned"]["seeds"].__setitem__("1", [[0, 50], [51, 50], [1, 50], [1, 50]]),
     "between 0 and n=50"),
])
def test_curves_that_cannot_be_judged_get_specific_errors(change, message):
    data = _data(FAST, FLAT)
    change(data)
    with pytest.raises(RV.CurveError, match=message):
        RV.analyse(data)


def test_rule_settings_are_checked():
    with pytest.raises(ValueError, match="alpha"):
        RV.analyse(_data(FAST, FLAT), RV.Rule(alpha=0))
    with pytest.raises(ValueError, match="quick_updates"):
        RV.analyse(_data(FAST, FLAT), RV.Rule(quick_updates=0))


def test_inconclusive_when_not_back_yet_and_the_budgets_stop_below_the_quick_budget():
    u = RV.analyse(_data(SLOW, FLAT), RV.Rule(quick_updates=200))["models"]["unlearned"]
    assert u["verdict"] == RV.INCONCLUSIVE and "stop at 100 < quick_updates 200" in u["reason"]
    assert RV.analyse(_data(FAST, FLAT), RV.Rule(quick_updates=200))["models"]["unlearned"]["verdict"] == RV.SHORT_TERM


def test_describe_gives_the_statistics_without_a_control():
    d = RV.describe({"updates": UPDATES, "original": [45, 50], "models": {"unlearned": {"seeds": {"1": FAST}}}})
    p = d["models"]["unlearned"]["points"][2]["rate"]
    assert (p["k"], p["n"]) == (40, 50) and p["ci_low"] < 0.8 < p["ci_high"]
    assert "p vs control" in d["text"] and "no control" in d["text"] and "e-" not in d["text"]


def test_a_model_already_showing_the_concept_at_0_updates_is_not_erased_and_0_never_counts_as_back():
    # 40/50 at 0 updates: Wilson lower bound ~0.67 >= 0.45 (half of 0.9): nothing was forgotten
    kept = [[40, 50], [41, 50], [42, 50], [43, 50]]
    u = RV.analyse(_data(kept, FLAT))["models"]["unlearned"]
    assert u["verdict"] == RV.NOT_ERASED and "0 updates" in u["reason"]
    # 25/50 at 0 (lower bound ~0.37 < 0.45) and never back later: the 0-update point does not make it short-term
    partial = [[25, 50], [24, 50], [25, 50], [26, 50]]
    v = RV.analyse(_data(partial, FLAT))["models"]["unlearned"]
    low0 = sps.binomtest(25, 50).proportion_ci(method="wilson").low  # the seeds' 0-update points: one model, once
    assert v["points"][0]["rate"]["k"] == 25 and low0 < 0.45
    assert v["verdict"] == RV.LONG_TERM, v["reason"]
    # a point at 0 whose lower bound is >= half but judged with a budget > 0 only: back at 25, never at 0
    w = RV.analyse(_data(FAST, FLAT))["models"]["unlearned"]
    assert "back at 25 updates" in w["reason"]


def test_speed_figures_are_compared_with_the_control_paired_over_seeds():
    data = _data(FAST, FLAT)
    data["models"]["unlearned"]["seeds"] = {"1": FAST, "2": [[0, 50], [25, 50], [35, 50], [45, 50]],
                                            "3": [[0, 50], [20, 50], [30, 50], [40, 50]]}
    data["models"]["never_learned"]["seeds"] = {"1": FLAT, "2": [[0, 50], [2, 50], [5, 50], [30, 50]],
                                                "3": [[0, 50], [0, 50], [1, 50], [2, 50]]}
    a = RV.analyse(data)
    u, c = a["models"]["unlearned"], a["models"]["never_learned"]
    auc = u["vs_control"]["auc"]
    diffs = [x - y for x, y in zip(u["auc"]["per_seed"], c["auc"]["per_seed"])]
    assert auc["mean"] == pytest.approx(sum(diffs) / 3) and auc["censored"] == 0
    # a second computation of the interval: scipy's percentile bootstrap of the differences' mean, its own call
    res = sps.bootstrap((diffs,), lambda x, axis: x.mean(axis=axis), method="percentile", n_resamples=9999,
                        random_state=0)
    spread = max(diffs) - min(diffs)
    assert auc["ci_low"] == pytest.approx(res.confidence_interval.low, abs=0.05 * spread)
    assert auc["ci_high"] == pytest.approx(res.confidence_interval.high, abs=0.05 * spread)
    # the control's seeds 1 and 3 never reach half: updates-to-half has no paired mean, the count says why
    half = u["vs_control"]["half_updates"]
    assert half["mean"] is None and half["censored"] == 2 and half["seeds"] == 3
    assert "model - control (paired over seeds)" in a["text"] and "2 of 3 seeds never reached half" in a["text"]
    assert "vs_control" not in c


def test_paired_difference_record_checks_its_pairs():
    from memora.evaluation import stats

    rec = stats.paired_difference_record([3.0, 5.0, 4.0], [1.0, 1.0, 2.0])
    assert rec["mean"] == pytest.approx(8 / 3) and rec["n"] == 3 and rec["difference"] == "tested - control"
    assert 2.0 <= rec["ci_low"] <= rec["mean"] <= rec["ci_high"] <= 4.0
    with pytest.raises(stats.StatsInputError, match="3 tested values but 2 control values"):
        stats.paired_difference_record([1, 2, 3], [1, 2])
