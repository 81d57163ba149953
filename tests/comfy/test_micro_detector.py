"""MemoRa Micro World Detector through ComfyUI's executor: the score-table contract columns (rate, n, ci_low, ci_high,
convention) per concept, the geometric judge's rate and the detector-judge agreement beside them, on drawn images
loaded by the stock LoadImage and batched by the stock ImageBatch."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from graphs import Graph

# one drawn image per class (the none image: a capsule, a near-shape the detector was taught to refuse)
TRUTH = ["circle", "square", "triangle", "star", "cross", "none", "star"]


def _images():
    from memora.micro import data
    from memora_build import micro_detector

    out = []
    for i, c in enumerate(TRUTH):
        rng = np.random.default_rng([2024, i])
        out.append(micro_detector.hard_negative("capsule", rng) if c == "none" else data.draw(c, rng))
    return np.stack(out)


def _node_module():
    import nodes

    return sys.modules[nodes.NODE_CLASS_MAPPINGS["MemoRaMicroDetector"].__module__]


def test_detector_node_reports_rates_with_intervals_judge_and_agreement(comfy, comfy_base):
    from memora.evaluation.stats import wilson_interval

    imgs = _images()
    g = Graph()
    batch = None
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(comfy_base / "input" / f"memora_micro_{i}.png")
        load = g.node("LoadImage", image=f"memora_micro_{i}.png")
        batch = load if batch is None else g.node("ImageBatch", image1=batch[0], image2=load[0])
    det = g.node("MemoRaMicroDetector", images=batch[0], concept="star", title="drawn shapes")
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    rate, report = comfy.node_outputs(det.id)
    table, summary = res.ui_outputs[det.id]["memora_scores"]
    assert table["title"] == "drawn shapes" and summary["title"] == "drawn shapes: detector vs judge"
    assert table["columns"][:6] == ["concept", "rate", "n", "ci_low", "ci_high", "convention"]
    rows = {r[0]: dict(zip(table["columns"], r)) for r in table["rows"]}
    assert list(rows) == ["circle", "square", "triangle", "star", "cross", "none"]
    n = len(TRUTH)
    for c, row in rows.items():
        k = TRUTH.count(c)
        # both the detector and the judge name every drawn shape (and refuse the capsule)
        assert row["n"] == n and row["rate"] == pytest.approx(k / n), (c, report)
        assert row["judge_rate"] == pytest.approx(k / n), (c, report)
        assert row["agreement"] == pytest.approx(1.0)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson_interval(k, n), abs=1e-4)
        assert (row["judge_ci_low"], row["judge_ci_high"]) == pytest.approx(wilson_interval(k, n), abs=1e-4)
        assert row["convention"] == "micro-top1"
    assert rate == pytest.approx(2 / 7)
    agree = dict(zip(summary["columns"], summary["rows"][0]))
    assert agree["agreement"] == 1.0 and agree["n_images"] == n and agree["convention"] == "micro-top1-vs-judge"
    assert agree["agreement_ci_low"] == pytest.approx(wilson_interval(n, n)[0], abs=1e-4)
    assert "rate of 'star' = 0.286 (2/7; 95% CI" in report and "same label on 1.000 (7/7" in report


def test_score_tables_count_disagreements():
    """Agreement per class is the share of images on which detector and judge agree whether the image shows that
    class; the summary is the share with the same label. Here the judge disagrees on two of five images."""
    mod = _node_module()
    from memora.micro.data import DETECTOR_CLASSES

    det = ["star", "star", "cross", "none", "circle"]
    judged = ["star", "none", "square", "none", "circle"]
    probs = torch.zeros(5, 6)
    for i, c in enumerate(det):
        probs[i, DETECTOR_CLASSES.index(c)] = 1.0
    (table, summary), report = mod.score_tables(probs, judged, "star", "t")
    rows = {r[0]: dict(zip(table["columns"], r)) for r in table["rows"]}
    assert rows["star"]["rate"] == pytest.approx(0.4) and rows["star"]["judge_rate"] == pytest.approx(0.2)
    assert rows["star"]["agreement"] == pytest.approx(0.8)      # image 2: star vs none
    assert rows["cross"]["agreement"] == pytest.approx(0.8)     # image 3: cross vs square
    assert rows["square"]["agreement"] == pytest.approx(0.8)
    assert rows["none"]["agreement"] == pytest.approx(0.8)      # image 2 again
    assert rows["circle"]["agreement"] == pytest.approx(1.0)
    assert summary["rows"][0][0] == pytest.approx(0.6) and summary["rows"][0][3] == 5
    assert "star, star/none, cross/square, none, circle" in report
