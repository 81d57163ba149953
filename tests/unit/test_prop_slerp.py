"""Property-based tests of memora.slerp (docs/method.md, step 5) with hypothesis.

Stated guarantees, for every pair of finite latents in fp16, bf16, fp32 and fp64:
- the endpoints (t = 0, t = 1) are the inputs, bit for bit;
- no NaN or inf ever comes out silently: the result is finite, or a ValueError names the dtype's range, and that
  only where the exact result does not fit the dtype (fp16 near-opposite pairs of unequal norms, huge entries);
- norms, as the method's formula defines them (z = sin((1-t) w)/sin w * a + sin(t w)/sin w * b on the raw latents):
  equal norms stay equal (|z| = |a|: the great circle), and for an acute angle (cos w >= 0) |z| lies between |a| and
  |b|. For an obtuse angle with unequal norms the formula leaves that range (a worked example below): that is the
  method's definition, not rounding. The accuracy near antiparallel pairs is limited by the working precision:
  relative error <= 8 eps_work (1 + 1 / (pi - w)) + eps_out, and pairs within sin w <= 1e-6 of it fall back to
  linear interpolation by design (the great circle through opposite points is undefined).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memora import slerp as S

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Reproducible (derandomize: the same examples every run) and no example database written into the repository.
PROP = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

KINDS = ["independent", "parallel", "antiparallel", "near_antiparallel", "near_parallel", "identical", "zero_a",
         "zero_both", "orthogonal"]


def _work_eps(dtype):
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


@st.composite
def pairs(draw, dtypes=DTYPES, kinds=KINDS, log_scale=(-3.0, 2.0)):
    """(a, b) of shape [B, N] in a dtype, built in fp64 from a seed, a kind and magnitudes, then rounded."""
    dtype = draw(st.sampled_from(dtypes))
    batch, n = draw(st.integers(1, 3)), draw(st.integers(1, 24))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    lo, hi = log_scale
    sa, sb = draw(st.floats(lo, hi)), draw(st.floats(lo, hi))
    tiny = 10 ** draw(st.floats(-7.0, -1.0))
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, generator=g, dtype=torch.float64)
    r = torch.randn(batch, n, generator=g, dtype=torch.float64)
    b = {"independent": r, "parallel": a * 1.7, "antiparallel": -a, "near_antiparallel": -a + tiny * r,
         "near_parallel": a + tiny * r, "identical": a, "zero_a": r, "zero_both": torch.zeros_like(a),
         "orthogonal": r - (r * a).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True) * a}[kind]
    if kind == "zero_a":
        a = torch.zeros_like(a)
    a = a / a.abs().amax(1, keepdim=True).clamp_min(1e-300) * 10 ** sa
    b = b / b.abs().amax(1, keepdim=True).clamp_min(1e-300) * 10 ** (sb if kind not in ("identical",) else sa)
    if kind == "zero_both":
        a = torch.zeros_like(a)
    return a.to(dtype), b.to(dtype)


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact-ish angle per row, in fp64, of the (rounded) inputs."""
    a, b = a.double(), b.double()
    ua, ub = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    return 2 * torch.atan2((ua - ub).norm(dim=1), (ua + ub).norm(dim=1))


def _reference(a: torch.Tensor, b: torch.Tensor, ts) -> torch.Tensor:
    """The method's formula in fp64 on the (rounded) inputs, with the linear fallback where sin w <= 1e-6."""
    a, b = a.double(), b.double()
    tt = torch.tensor(ts, dtype=torch.float64)[None, :, None]
    omega = _angle(a, b)[:, None, None]
    sin = torch.sin(omega)
    sph = (sin.abs() > 1e-6) & (a.norm(dim=1) > 0)[:, None, None] & (b.norm(dim=1) > 0)[:, None, None]
    sin = torch.where(sph, sin, torch.ones_like(sin))
    wa = torch.where(sph, torch.sin((1 - tt) * omega) / sin, 1 - tt)
    wb = torch.where(sph, torch.sin(tt * omega) / sin, tt)
    return wa * a[:, None] + wb * b[:, None]


ts_strategy = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5).map(lambda x: [0.0] + x + [1.0])


@PROP
@given(pairs(), ts_strategy)
def test_endpoints_exact_and_result_finite(pair, ts):
    a, b = pair
    a0, b0 = a.clone(), b.clone()
    try:
        out = S.slerp(a, b, ts)
    except ValueError as e:
        # only where the exact result does not fit the dtype (near-opposite pairs of unequal norms: the formula
        # amplifies |b| - |a| by about 1 / (pi - w))
        assert "exceeds the range" in str(e)
        assert float(_reference(a, b, ts).abs().max()) > torch.finfo(a.dtype).max / 2
        return
    assert out.dtype == a.dtype and out.shape == (a.shape[0], len(ts), a.shape[1])
    assert torch.equal(out[:, 0], a) and torch.equal(out[:, -1], b)
    assert torch.isfinite(out).all(), (a, b, out)
    assert torch.equal(a, a0) and torch.equal(b, b0)


@PROP
@given(pairs(log_scale=(-40.0, 300.0), dtypes=[torch.float32, torch.float64]), ts_strategy)
def test_huge_and_tiny_vectors_never_give_nan(pair, ts):
    """Entries up to 1e300 (fp64) or fp32's maximum, down to 1e-40 (subnormal in fp32): a finite result or a clear
    ValueError, never a NaN (before the fix, fp32 vectors of 1e30 entries had an infinite norm and a NaN angle)."""
    a, b = pair
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return  # the drawn magnitude does not fit the dtype: not a finite pair
    try:
        out = S.slerp(a, b, ts)
    except ValueError as e:
        assert "exceeds the range" in str(e)
        return
    assert not torch.isnan(out).any() and torch.isfinite(out).all()
    assert torch.equal(out[:, 0], a) and torch.equal(out[:, -1], b)
    # and the right angle: the method's formula, evaluated in fp64 on rows scaled to ~1 (no overflow there)
    scale = torch.maximum(a.double().abs().amax(1, keepdim=True), b.double().abs().amax(1, keepdim=True))
    if not (scale > 0).all():
        return
    a64, b64 = a.double() / scale, b.double() / scale
    if not ((a64.norm(dim=1) > 0) & (b64.norm(dim=1) > 0)).all():
        return
    omega = _angle(a64, b64)[:, None, None]
    if (torch.sin(omega) <= 1e-3).any():
        return
    tt = torch.tensor(ts, dtype=torch.float64)[None, :, None]
    ref = (torch.sin((1 - tt) * omega) * a64[:, None] + torch.sin(tt * omega) * b64[:, None]) / torch.sin(omega)
    err = (out.double() / scale[:, None] - ref).abs()
    assert (err <= 64 * _work_eps(a.dtype) / torch.sin(omega) + 1e-30 / scale[:, None]).all()


def test_huge_fp32_vectors_keep_their_angle():
    """What the property found: fp32 entries of 1e30 have a norm above fp32's range; the angle was then taken as
    90 degrees whatever it was (cos = x / inf = 0)."""
    a = torch.full((1, 8), 1e30)
    b = a.clone()
    b[0, 0] = -1e30  # cos = 6/8
    w = math.acos(6 / 8)
    mid = S.slerp(a, b, [0.5])[0, 0].double()
    ref = math.sin(w / 2) / math.sin(w) * (a[0].double() + b[0].double())
    assert torch.isfinite(mid).all()
    assert torch.allclose(mid, ref, rtol=1e-6)


def test_out_of_range_result_is_refused_not_inf():
    a = torch.tensor([[60000.0, 60000.0]], dtype=torch.float16)
    b = torch.tensor([[60000.0, -60000.0]], dtype=torch.float16)  # orthogonal: the midpoint is 84853 > fp16 max
    with pytest.raises(ValueError, match="exceeds the range of torch.float16"):
        S.slerp(a, b, [0.5])
    with pytest.raises(ValueError, match="must be finite"):
        S.slerp(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[1.0, 1.0]]), [0.5])


def _norm_tolerance(a, b, omega):
    eps_w, eps_o = _work_eps(a.dtype), torch.finfo(a.dtype).eps
    return 8 * eps_w * (1 + 1 / (math.pi - omega).clamp_min(1e-300)) + eps_o


@st.composite
def equal_norm_pairs(draw):
    """b a signed permutation of a: |b| = |a| exactly in every dtype, at any angle (identical, opposite, nearly
    opposite when one entry dominates, orthogonal, ...)."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 12))
    values = draw(st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n).filter(lambda v: any(v)))
    small = draw(st.sampled_from([1.0, 1e-2, 1e-3, 1e-4]))
    a = torch.tensor([values[0]] + [v * small for v in values[1:]], dtype=torch.float64).to(dtype)[None]
    perm = draw(st.permutations(range(n)))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n, max_size=n))
    b = a[:, list(perm)] * torch.tensor(signs, dtype=dtype)
    return a, b


@PROP
@given(equal_norm_pairs(), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6))
def test_equal_norms_stay_on_the_sphere(pair, ts):
    a, b = pair
    if not a.any():
        return  # entries below the dtype's range
    omega = _angle(a, b)
    if float(torch.sin(omega).abs()) <= 1e-6:
        return  # the linear fallback near opposite vectors shrinks the norm by design
    z = S.slerp(a, b, ts).double()
    na = a.double().norm(dim=1)
    assert math.isclose(float(b.double().norm(dim=1)), float(na), rel_tol=1e-14)
    rel = (z.norm(dim=-1) / na[:, None] - 1).abs()
    tol = _norm_tolerance(a, b, omega)
    assert (rel <= tol[:, None]).all(), (rel, tol, omega)


@PROP
@given(pairs(kinds=["independent", "near_parallel", "orthogonal", "parallel", "zero_a"]),
       st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6))
def test_acute_pairs_norm_between_the_endpoints_norms(pair, ts):
    a, b = pair
    cos = (a.double() * b.double()).sum(1)
    keep = cos >= 0
    if not keep.any():
        return
    z = S.slerp(a, b, ts).double()[keep].norm(dim=-1)
    na, nb = a.double().norm(dim=1)[keep, None], b.double().norm(dim=1)[keep, None]
    tol = 8 * _work_eps(a.dtype) + torch.finfo(a.dtype).eps
    assert (z >= torch.minimum(na, nb) * (1 - tol) - 1e-300).all()
    assert (z <= torch.maximum(na, nb) * (1 + tol)).all()


def test_obtuse_pair_with_unequal_norms_leaves_the_range_as_the_formula_says():
    """Not a property: the method's slerp of raw latents, a short a at 0.9 pi from a long b, overshoots |b|."""
    w = 0.9 * math.pi
    a = torch.tensor([[0.01, 0.0]], dtype=torch.float64)
    b = torch.tensor([[math.cos(w), math.sin(w)]], dtype=torch.float64)
    mid = S.slerp(a, b, [0.5])[0, 0]
    ref = math.sin(0.5 * w) / math.sin(w) * (a[0] + b[0])
    assert torch.allclose(mid, ref, rtol=1e-12)
    assert float(mid.norm()) > 3.0 > float(b.norm())


@PROP
@given(pairs(dtypes=[torch.float64], kinds=["independent", "orthogonal"]), st.floats(0.01, 0.99))
def test_matches_the_method_formula(pair, t):
    a, b = pair
    if not (a.norm(dim=1) > 0).all() or not (b.norm(dim=1) > 0).all():
        return
    omega = _angle(a, b)[:, None]
    if (torch.sin(omega) <= 1e-3).any():
        return
    ref = torch.sin((1 - t) * omega) / torch.sin(omega) * a + torch.sin(t * omega) / torch.sin(omega) * b
    out = S.slerp(a, b, [t])[:, 0]
    scale = torch.maximum(a.abs().amax(1, keepdim=True), b.abs().amax(1, keepdim=True))
    assert ((out - ref).abs() <= 1e-10 * scale / torch.sin(omega)).all()
