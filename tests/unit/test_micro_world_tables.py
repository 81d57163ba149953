"""scripts/micro_world_tables.py: the results page's tables from the counts of a stored --quick run.

tests/unit/micro_world_quick.json is the ``collected.json`` that ``python scripts/micro_world_results.py --quick``
wrote (the counts the micro world's models produced through memora-batch; image paths removed). Every number on the
page must follow from those counts: k/n, Wilson intervals, Fisher p-values against the control, the verdicts of
memora.evaluation.recovery, the shares of the original's rate, the Multi-MemoRa interference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from scipy import stats as sps

from memora.evaluation import recovery, stats

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import micro_world_tables as T  # noqa: E402

DATA = Path(__file__).with_name("micro_world_quick.json")


@pytest.fixture(scope="module")
def data():
    return json.loads(DATA.read_text())


@pytest.fixture(scope="module")
def built(data):
    return T.build(data)


def test_every_curve_point_is_its_pooled_counts_with_a_wilson_interval(data, built):
    a = built["curves"]
    assert a["original"]["k"] == data["curves"]["original"][0] and a["original"]["n"] == data["curves"]["original"][1]
    for name, m in data["curves"]["models"].items():
        for i, p in enumerate(a["models"][name]["points"]):
            seeds = [pts[i] for pts in m["seeds"].values()]
            k, n = (seeds[0] if i == 0 and len({tuple(s) for s in seeds}) == 1
                    else (sum(s[0] for s in seeds), sum(s[1] for s in seeds)))
            r = p["rate"]
            assert (r["k"], r["n"]) == (k, n) and r["rate"] == pytest.approx(k / n)
            low, high = sps.binomtest(k, n).proportion_ci(method="wilson")
            assert r["ci_low"] == pytest.approx(max(0.0, low)) and r["ci_high"] == pytest.approx(min(1.0, high))
            assert r["convention"] == T.CONVENTION


def test_fisher_p_against_the_control_and_the_verdicts_follow_the_rule(data, built):
    a = built["curves"]
    ctrl = a["models"][T.CONTROL]
    assert ctrl["verdict"] == recovery.CONTROL
    again = recovery.analyse({"updates": data["updates"], "original": data["curves"]["original"],
                              "control": T.CONTROL, "convention": T.CONVENTION, "models": data["curves"]["models"]})
    for name, c in a["models"].items():
        assert c["verdict"] == again["models"][name]["verdict"]
        if name == T.CONTROL:
            continue
        for p, q in zip(c["points"], ctrl["points"]):
            x, y = p["rate"], q["rate"]
            want = sps.fisher_exact([[x["k"], x["n"] - x["k"]], [y["k"], y["n"] - y["k"]]],
                                    alternative="greater").pvalue
            assert p["fisher_p"] == pytest.approx(want)
        assert c["verdict"] in (recovery.SHORT_TERM, recovery.LONG_TERM, recovery.NOTHING, recovery.INCONCLUSIVE,
                                recovery.NOT_ERASED)


def test_strength_multi_and_ablations_are_consistent_with_their_counts(data, built):
    orig = built["curves"]["original"]["rate"]
    for row in built["strength"]["rows"]:
        r = row["rate"]
        assert row["share"]["rate"] == pytest.approx(r["rate"] / orig)
        assert row["share"]["ci_low"] == pytest.approx(r["ci_low"] / orig)
    best = max(built["strength"]["rows"], key=lambda x: x["rate"]["rate"])
    assert built["strength"]["target_met"] == (best["share"]["rate"] >= 0.7 and best["share"]["ci_low"] >= 0.5)
    m = built["multi"]
    for cfg, by in data["multi"].items():
        for concept, seeds in by.items():
            k, n = sum(v[0] for v in seeds.values()), sum(v[1] for v in seeds.values())
            assert (m["rates"][cfg][concept]["k"], m["rates"][cfg][concept]["n"]) == (k, n)
    assert m["interference"], "no interference rows"
    for i in m["interference"]:
        single = "star LoRA alone" if i["concept"] == "star" else "cross LoRA alone"
        assert i["lost"] == pytest.approx(m["rates"][single][i["concept"]]["rate"] -
                                          m["rates"][i["merge"]][i["concept"]]["rate"])
    abl = built["ablations"]["models"]
    assert f"default ({T.TESTED})" in abl and set(data["ablations"]["models"]) <= set(abl)
    for name in data["ablations"]["models"]:
        assert 0.0 <= abl[name]["p_vs_default_last"] <= 1.0 and 0.0 <= abl[name]["p_vs_default_best"] <= 1.0


def test_an_ablation_with_fewer_seeds_is_compared_on_its_own_seeds(data):
    """The curves measured with LoRA seeds 1 and 2, an ablation with seed 1 only: the ablation is analysed against
    the control and the default restricted to seed 1 (like with like), the default's own row keeps both seeds."""
    import copy

    d = copy.deepcopy(data)
    for name in (T.TESTED, T.CONTROL):
        m = d["curves"]["models"][name]
        (s1,) = list(m["seeds"])
        m["seeds"]["2"] = [[0, n] if i else [k, n] for i, (k, n) in enumerate(m["seeds"][s1])]
        m["similarity"]["2"] = m["similarity"][s1]
    built = T.build(d)
    abl = built["ablations"]["models"]
    assert abl[f"default ({T.TESTED})"]["seeds_used"] == sorted([next(iter(data["curves"]["models"][T.TESTED]
                                                                           ["seeds"])), "2"])
    name = next(iter(data["ablations"]["models"]))
    assert abl[name]["seeds_used"] == sorted(data["ablations"]["models"][name]["seeds"])
    # the same numbers as the one-seed data gives (seed 2 left out of the comparison)
    one = T.build(data)["ablations"]["models"][name]
    assert abl[name]["p_vs_default_last"] == pytest.approx(one["p_vs_default_last"])
    assert [p["fisher_p"] for p in abl[name]["points"]] == [p["fisher_p"] for p in one["points"]]


def test_page_and_json_are_written_with_every_table(built, tmp_path):
    T.write_page(built, tmp_path)
    md = (tmp_path / "micro-world-results.md").read_text()
    for heading in ("Recovery verdicts", "Curves per variant", "Recovery strength on ESD-x", "AutoMemoRa",
                    "Multi-MemoRa", "Ablations"):
        assert f"## {heading}" in md, heading
    k, n = built["curves"]["original"]["k"], built["curves"]["original"]["n"]
    assert stats.format_rate(built["curves"]["original"]) in md and f"({k}/{n};" in md
    assert json.loads((tmp_path / "micro-world-results.json").read_text())["curves"]["control"] == T.CONTROL
    assert (tmp_path / "img" / "micro-world-curves.png").stat().st_size > 10_000


def test_a_unit_folder_started_with_other_settings_is_set_aside(tmp_path):
    """A unit rerun for other settings (other weights) starts in a fresh folder: the old one, whose memora-batch
    records have other keys and would be counted beside the new ones, is moved to '<name>.stale-<time>' and left out
    of the page; a folder started with the same settings is kept (memora-batch resumes its finished jobs)."""
    import micro_world_results as R

    unit = tmp_path / "curves" / "esd_x-seed1"
    (unit / "curve").mkdir(parents=True)
    (unit / "curve" / "results.jsonl").write_text('{"key": "old"}\n')
    (unit / "done.json").write_text(json.dumps({"settings": {"weights": "old"}}))
    R.set_aside_stale(unit, {"weights": "new"})
    assert not (unit / "curve").exists()
    assert json.loads((unit / "started.json").read_text())["settings"] == {"weights": "new"}
    (aside,) = [p for p in unit.parent.iterdir() if ".stale-" in p.name]
    assert (aside / "curve" / "results.jsonl").read_text() == '{"key": "old"}\n'
    (unit / "curve").mkdir()
    (unit / "curve" / "results.jsonl").write_text('{"key": "new"}\n')
    R.set_aside_stale(unit, {"weights": "new"})  # the same settings: resumed in place
    assert (unit / "curve" / "results.jsonl").read_text() == '{"key": "new"}\n'
    assert T.unit_folders(tmp_path / "curves") == [unit]
