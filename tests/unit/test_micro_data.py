"""The micro world's dataset and detector (no ComfyUI): determinism, variety, and the shipped detector's accuracy on
images it has never seen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memora.micro import data, detector, world


def test_dataset_is_deterministic_and_seed_dependent():
    a, la = data.make_dataset(6, seed=11)
    b, lb = data.make_dataset(6, seed=11)
    c, _ = data.make_dataset(6, seed=12)
    assert a.shape == (30, data.IMAGE_SIZE, data.IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert sorted(np.bincount(la).tolist()) == [6] * len(data.CONCEPTS)


def test_never_learned_data_is_the_same_minus_one_concept():
    """Each image has its own generator, so dropping a concept leaves the other concepts' images unchanged."""
    full, lf = data.make_dataset(5, seed=3)
    rest_concepts = tuple(c for c in data.CONCEPTS if c != world.ERASED_CONCEPT)
    rest, lr = data.make_dataset(5, seed=3, concepts=rest_concepts)
    for i, concept in enumerate(rest_concepts):
        fi = data.CONCEPTS.index(concept)
        got = {full[k].tobytes() for k in np.flatnonzero(lf == fi)}
        want = {rest[k].tobytes() for k in np.flatnonzero(lr == i)}
        assert got == want, concept
    assert data.CONCEPTS.index(world.ERASED_CONCEPT) not in [data.CONCEPTS.index(c) for c in rest_concepts]


@pytest.mark.parametrize("concept", data.CONCEPTS)
def test_real_in_class_variety(concept):
    rng = np.random.default_rng(5)
    imgs = np.stack([data.draw(concept, rng) for _ in range(24)]).astype(np.float64)
    # backgrounds (corner pixels) and shape colours differ from image to image
    corners = imgs[:, 0, 0, :]
    assert corners.std(axis=0).mean() > 5
    # the shape's centre of mass (pixels far from the image's corner colour) moves around
    dist = np.abs(imgs - corners[:, None, None, :]).sum(-1) > 60
    ys, xs = np.mgrid[0:data.IMAGE_SIZE, 0:data.IMAGE_SIZE]
    area = dist.sum((1, 2))
    assert (area > 20).all(), "every image shows a visible shape"
    cy = (dist * ys).sum((1, 2)) / area
    cx = (dist * xs).sum((1, 2)) / area
    assert cy.std() > 1.5 and cx.std() > 1.5
    assert area.std() > 20, "sizes vary"


def test_captions_and_unknown_concept():
    assert data.caption("star") == "a photo of a star"
    with pytest.raises(ValueError, match="unknown micro-world concept"):
        data.caption("parachute")


def test_prepare_checks_and_resizes():
    imgs = torch.rand(2, 64, 64, 4)
    x = detector.prepare(imgs)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert detector.prepare(torch.rand(1, 16, 16, 1)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="shape"):
        detector.prepare(torch.rand(32, 32, 3))
    with pytest.raises(ValueError, match="empty"):
        detector.prepare(torch.rand(0, 32, 32, 3))
    bad = torch.rand(1, 32, 32, 3)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        detector.prepare(bad)


def _shipped_detector():
    from safetensors.torch import load_file

    manifest = world.load_manifest()
    det = detector.from_state_dict(load_file(str(world.weight_path("detector", manifest=manifest))))
    return det, manifest


def test_shipped_detector_accuracy_on_fresh_images():
    """Images from a seed the build never used: the shipped detector names >= 95 % of them (every class >= 85 %)."""
    det, manifest = _shipped_detector()
    imgs, labels = data.make_dataset(60, seed=424242, concepts=data.DETECTOR_CLASSES)
    x = data.to_tensor_range(imgs)
    pred = detector.probabilities(det, x).argmax(-1).numpy()
    acc = float((pred == labels).mean())
    per_class = {c: float((pred[labels == i] == i).mean()) for i, c in enumerate(data.DETECTOR_CLASSES)}
    print(f"fresh-image accuracy {acc:.3f}; per class {per_class}; "
          f"manifest held-out per class {manifest['recipe']['detector']['evaluation']['per_class']}")
    assert acc >= 0.95, per_class
    assert min(per_class.values()) >= 0.85, per_class


def test_detector_rates_count_top_classes():
    probs = torch.tensor([[0.9, 0, 0, 0.1, 0, 0], [0.1, 0, 0, 0.8, 0.1, 0], [0, 0, 0, 0.4, 0, 0.6]])
    r = detector.rates(probs)
    assert r["circle"] == pytest.approx(1 / 3) and r["star"] == pytest.approx(1 / 3) and r["none"] == pytest.approx(1 / 3)
    assert r["square"] == 0.0
