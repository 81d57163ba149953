"""The micro world's geometric judge (memora.micro.judge): its accuracy on fresh procedural images, the geometry it
rests on (a pentagon is no star, an ellipse no circle), agreement counting and the disagreement contact sheet."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from memora.micro import data, judge
from memora_build import micro_detector


def _polygon_image(points, fg=(40, 60, 160), bg=(235, 230, 220), size=32, ss=4):
    big = Image.new("RGB", (size * ss, size * ss), bg)
    ImageDraw.Draw(big).polygon([(x * ss, y * ss) for x, y in points], fill=fg)
    return np.asarray(big.resize((size, size), Image.BOX))


def _regular(n, r=10.0, rot=0.3, cx=16.0, cy=16.0, inner=None):
    k = 2 * n if inner else n
    return [(cx + (r if (i % 2 == 0 or not inner) else r * inner) * math.cos(rot + 2 * math.pi * i / k),
             cy + (r if (i % 2 == 0 or not inner) else r * inner) * math.sin(rot + 2 * math.pi * i / k))
            for i in range(k)]


def test_judge_names_fresh_procedural_shapes():
    """40 fresh drawn images per class (a seed nothing was tuned on). Measured: every shape 1.000, none 0.95-1.0
    (the misses: irregular blobs that happen to look triangular)."""
    imgs, labels = data.make_dataset(40, 31337, data.DETECTOR_CLASSES)
    got = judge.judge_batch(imgs)
    for ci, c in enumerate(data.DETECTOR_CLASSES):
        acc = np.mean([g == c for g, y in zip(got, labels) if y == ci])
        assert acc >= (0.9 if c == data.NONE else 0.95), (c, acc)


def test_judge_refuses_near_shapes_and_keeps_wide_crosses():
    hard, kinds = micro_detector.hard_negatives(48, 4242)
    got = judge.judge_batch(hard)
    assert np.mean([g == data.NONE for g in got]) >= 0.95, list(zip(got, kinds))
    # crosses with wide, round-ended arms (as the models draw them) are crosses: measured 60/60
    fat = [micro_detector.fat_cross(np.random.default_rng([17, i])) for i in range(24)]
    assert np.mean([g == "cross" for g in judge.judge_batch(np.stack(fat))]) >= 0.95


def test_judge_geometry():
    # a regular pentagon has five corners but no points: not a star (its fifth harmonic is 0.086, stars ~0.3)
    v = judge.judge(_polygon_image(_regular(5)))
    assert v.label == "none" and v.harmonics[4] == pytest.approx(0.086, abs=0.02) and v.solidity > 0.95
    star = judge.judge(_polygon_image(_regular(5, inner=0.45)))
    assert star.label == "star" and star.solidity < 0.8 and star.harmonics[4] > 0.25
    assert judge.judge(_polygon_image(_regular(3))).label == "triangle"
    assert judge.judge(_polygon_image(_regular(4))).label == "square"
    # the same square, light on a dark background: the judge measures ink against the border, not darkness
    assert judge.judge(_polygon_image(_regular(4), fg=(250, 250, 200), bg=(30, 30, 60))).label == "square"
    ellipse = [(16 + 12 * math.cos(t), 16 + 5 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 60)]
    e = judge.judge(_polygon_image(ellipse))
    assert e.label == "none" and e.reason == "elongated" and e.elongation == pytest.approx(2.4, rel=0.1)
    circle = [(16 + 9 * math.cos(t), 16 + 9 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 90)]
    assert judge.judge(_polygon_image(circle)).label == "circle"
    blank = np.full((32, 32, 3), 230, np.uint8)
    assert judge.judge(blank).reason == "no contrast"
    dots = _polygon_image(_regular(8, r=6, cx=8, cy=8))
    dots = np.minimum(dots, _polygon_image(_regular(8, r=6, cx=23, cy=22)))
    assert judge.judge(dots).reason == "several regions"
    assert judge.judge(_polygon_image(_regular(12, r=3))).reason == "region too small"  # a dot, not a circle
    # five wide, square-ended arms: five-fold, but no star (its tips are not pointed)
    arms = np.full((32, 32, 3), 235, np.uint8)
    for k in range(5):
        a = 0.4 + 2 * math.pi * k / 5
        c, s_ = math.cos(a), math.sin(a)
        arm = [(16 + c * x - s_ * y, 16 + s_ * x + c * y) for x, y in ((0, -3.2), (11, -3.2), (11, 3.2), (0, 3.2))]
        arms = np.minimum(arms, _polygon_image(arm))
    five = judge.judge(arms)
    assert five.label == "none" and five.reason == "five wide arms" and five.tips > 0.4 and star.tips < 0.3


def test_judge_input_checks():
    with pytest.raises(ValueError, match=r"one image of shape \[height, width, channels\]"):
        judge.judge(np.zeros((32, 32)))
    with pytest.raises(ValueError, match="too small"):
        judge.judge(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        judge.judge(np.full((32, 32, 3), np.nan))
    with pytest.raises(ValueError, match=r"batch of images"):
        judge.judge_batch(np.zeros((32, 32, 3)))
    # floats in 0..1 and uint8 in 0..255 are the same image
    img = data.draw("cross", np.random.default_rng(3))
    assert judge.judge(img).as_dict() == judge.judge(img.astype(np.float32) / 255).as_dict()


def test_agreement_counts_pairs_and_refuses_mismatches():
    a = judge.agreement(["star", "star", "none", "cross"], ["star", "none", "none", "square"])
    assert (a["k"], a["n"], a["rate"]) == (2, 4, 0.5)
    assert a["pairs"] == {"cross/square": 1, "none/none": 1, "star/none": 1, "star/star": 1}
    with pytest.raises(ValueError, match="one judge label per detector label; got 2 and 1"):
        judge.agreement(["star", "star"], ["star"])
    with pytest.raises(ValueError, match="unknown label 'hexagon'"):
        judge.agreement(["hexagon"], ["star"])
    with pytest.raises(ValueError, match="at least one image"):
        judge.agreement([], [])


def test_disagreement_sheet_shows_only_disagreements():
    rng = np.random.default_rng(5)
    imgs = np.stack([data.draw(c, rng) for c in ("star", "circle", "cross")])
    assert judge.disagreement_sheet(imgs, ["star", "circle", "cross"], ["star", "circle", "cross"]) is None
    sheet = judge.disagreement_sheet(imgs, ["star", "circle", "cross"], ["star", "none", "square"],
                                     names=["m:a", "m:b", "m:c"], cols=8, scale=4)
    arr = np.asarray(sheet)
    cell_w = 128 + 4
    assert sheet.size == (8 * cell_w, 128 + 36 + 4)
    # the two disagreeing images, upscaled 4x, in the first two cells; the third cell is blank
    assert np.array_equal(arr[2:130, 2:130], np.kron(imgs[1], np.ones((4, 4, 1), np.uint8)))
    assert np.array_equal(arr[2:130, cell_w + 2:cell_w + 130], np.kron(imgs[2], np.ones((4, 4, 1), np.uint8)))
    assert (arr[:, 2 * cell_w:] == 255).all()
    assert (arr[131:166, 2:130] < 128).any()  # captions drawn under the image
    with pytest.raises(ValueError, match="one detector and one judge label per image"):
        judge.disagreement_sheet(imgs, ["star"], ["star"])


def test_judge_keeps_stretched_triangles():
    """Stretching is centrally symmetric: it adds the second harmonic, not the third. The models draw triangles
    stretched further than the data (elongation ~1.5, where drawn ones stay <= 1.33); the judge still calls them
    triangles, and an ellipse or a rectangle stretched the same way (no odd harmonics) is no triangle."""
    def stretched(points, s, rot=0.7, cx=16.0, cy=16.0):
        c, s_ = math.cos(rot), math.sin(rot)
        out = []
        for x, y in points:
            dx, dy = (x - cx) * s, (y - cy) / s
            out.append((cx + c * dx - s_ * dy, cy + s_ * dx + c * dy))
        return out

    for s in (1.15, 1.2, 1.25):
        v = judge.judge(_polygon_image(stretched(_regular(3, r=11.0, rot=-math.pi / 2), s)))
        assert v.label == "triangle" and v.elongation > 1.3, (s, v)
    # beyond the cap (elongation 1.8) a stretched triangle is a sliver, not the concept the world draws
    sliver = judge.judge(_polygon_image(stretched(_regular(3, r=11.0, rot=-math.pi / 2), 1.35)))
    assert sliver.label == "none" and sliver.elongation > 1.8, sliver
    for s in (1.2, 1.25):
        ellipse = judge.judge(_polygon_image(stretched(_regular(40, r=10.0), s)))
        box = judge.judge(_polygon_image(stretched(_regular(4, r=10.0, rot=math.pi / 4), s)))
        assert "triangle" not in (ellipse.label, box.label) and ellipse.elongation > 1.4, (s, ellipse, box)
