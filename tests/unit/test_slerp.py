import math

import pytest
import torch

from memora import slerp as S


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def test_endpoints_returned_exactly_and_inputs_unmodified():
    a, b = _rand(3, 4, 8, 8, seed=1), _rand(3, 4, 8, 8, seed=2)
    a0, b0 = a.clone(), b.clone()
    out = S.slerp(a, b, [0.0, 0.5, 1.0])
    assert out.shape == (3, 3, 4, 8, 8)
    assert torch.equal(out[:, 0], a) and torch.equal(out[:, 2], b)
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_matches_closed_form_and_pairs_never_cross():
    a, b = _rand(2, 16, seed=3, dtype=torch.float64), _rand(2, 16, seed=4, dtype=torch.float64)
    out = S.slerp(a, b, [0.3])
    for i in range(2):
        om = math.acos(float((a[i] / a[i].norm()) @ (b[i] / b[i].norm())))
        ref = math.sin(0.7 * om) / math.sin(om) * a[i] + math.sin(0.3 * om) / math.sin(om) * b[i]
        assert torch.allclose(out[i, 0], ref, rtol=1e-12, atol=1e-12)


def test_norm_interpolation_of_unit_vectors_stays_on_sphere():
    a, b = _rand(4, 64, seed=5, dtype=torch.float64), _rand(4, 64, seed=6, dtype=torch.float64)
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    out = S.slerp(a, b, torch.linspace(0, 1, 11))
    norms = out.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-12)
    # Equal angular steps: the angle to `a` grows linearly with t.
    ang = torch.arccos((out * a[:, None]).sum(-1).clamp(-1, 1))
    steps = ang[:, 1:] - ang[:, :-1]
    assert torch.allclose(steps, steps[:, :1].expand_as(steps), atol=1e-9)


def test_norms_of_gaussian_latents_do_not_collapse_like_lerp():
    a, b = _rand(1, 4 * 64 * 64, seed=7), _rand(1, 4 * 64 * 64, seed=8)
    mid_slerp = S.slerp(a, b, [0.5])[0, 0].norm()
    mid_lerp = (0.5 * (a + b)).norm()
    # For near-orthogonal high-dimensional vectors slerp keeps the norm; lerp shrinks it by ~1/sqrt(2).
    assert abs(float(mid_slerp / a.norm()) - 1) < 0.02
    assert float(mid_lerp / a.norm()) < 0.75


@pytest.mark.parametrize("kind", ["identical", "nearly_parallel", "opposite", "zero"])
def test_degenerate_pairs_are_finite(kind):
    a = _rand(2, 4, 8, 8, seed=9)
    if kind == "identical":
        b = a.clone()
    elif kind == "nearly_parallel":
        b = a * 1.5 + 1e-7 * _rand(2, 4, 8, 8, seed=10)
    elif kind == "opposite":
        b = -a
    else:
        b = torch.zeros_like(a)
    out = S.slerp(a, b, torch.linspace(0, 1, 11))
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 0], a) and torch.equal(out[:, -1], b)
    if kind == "identical":
        assert torch.allclose(out, a[:, None].expand_as(out), atol=1e-6)


def test_half_precision_inputs_computed_in_fp32_and_returned_in_input_dtype():
    a, b = _rand(2, 256, seed=11, dtype=torch.float16), _rand(2, 256, seed=12, dtype=torch.float16)
    out = S.slerp(a, b, [0.25, 0.75])
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref = S.slerp(a.float(), b.float(), [0.25, 0.75])
    assert torch.allclose(out.float(), ref, atol=2e-3)


def test_pair_major_layout_and_points():
    a, b = _rand(3, 4, 2, 2, seed=13), _rand(3, 4, 2, 2, seed=14)
    out = S.slerp_pairs(a, b, intervals=10, include_endpoints=True)
    assert out.shape == (33, 4, 2, 2)
    assert torch.equal(out[0], a[0]) and torch.equal(out[10], b[0]) and torch.equal(out[11], a[1])
    assert S.interpolation_points(10, False) == [i / 10 for i in range(1, 10)]
    with pytest.raises(ValueError, match="intervals must be >= 1"):
        S.interpolation_points(0)
    with pytest.raises(ValueError, match="no interpolation points"):
        S.interpolation_points(1, include_endpoints=False)


def test_shape_mismatch_and_empty_batch_rejected():
    with pytest.raises(ValueError, match="equal shapes"):
        S.slerp(torch.zeros(2, 3), torch.zeros(3, 3), [0.5])
    with pytest.raises(ValueError, match="non-empty"):
        S.slerp(torch.zeros(0, 3), torch.zeros(0, 3), [0.5])
