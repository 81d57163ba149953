"""Property-based test of the exact DDIM round trip (memora/ddim.py) with hypothesis.

Stated tolerance. For a denoiser eps(x, sigma) that is L-Lipschitz in x, on a descending ladder whose largest step is
D, with q = D * L < 1: each inversion step solves x_b = x_a + (s_b - s_a) eps(x_b, s_b) by k + 1 fixed-point
evaluations (k = refine_iterations), leaving a residual <= q^(k+1) * D * |eps(x_a, s_b)| in the regenerated step, and
each later regeneration step amplifies an error by at most 1 + q. Hence, with E the largest |eps| met and n steps:

    max |regenerate(invert(x0)) - x0| <= q^(k+1) * (1 + q)^n * sigma_max * E  (+ rounding: 1e-9 fp64, 1e-4 fp32)

For k = 0 that is the first-order error of plain DDIM inversion; it shrinks geometrically with refinement. Checked
for random linear eps functions (M(sigma) x + c(sigma)) and random small tanh networks, random ladders and step
counts."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memora import ddim

PROP = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def ladders(draw):
    """A strictly descending sigma ladder of 1..12 steps from up to 20 down to 0 (or to a small positive sigma)."""
    n = draw(st.integers(1, 12))
    top = draw(st.floats(0.2, 20.0))
    cuts = sorted(set(draw(st.lists(st.floats(0.02, 0.98), min_size=n - 1, max_size=n - 1))), reverse=True)
    end = draw(st.sampled_from([0.0, 0.0, 0.01]))
    ladder = [top] + [end + c * (top - end) for c in cuts] + [end]
    return [s for i, s in enumerate(ladder) if i == 0 or s < ladder[i - 1]]


class Recorder:
    """eps function wrapper that records the largest |eps| it returned."""

    def __init__(self, fn):
        self.fn, self.max_abs = fn, 0.0

    def __call__(self, x, sigma):
        e = self.fn(x, sigma)
        self.max_abs = max(self.max_abs, float(e.abs().max()))
        return e


def _spectral(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m, ord=2))


def linear_eps(seed: int, dim: int, lipschitz: float, dtype):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(dim, dim, generator=g, dtype=torch.float64), torch.randn(dim, dim, generator=g, dtype=torch.float64)
    c0, c1 = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    norm = _spectral(a) + _spectral(b)

    def eps(x, sigma):
        m = lipschitz * (a + math.sin(sigma) * b) / norm  # spectral norm <= lipschitz at every sigma
        return (x.double() @ m.T + c0 + sigma * c1).to(dtype)

    return eps


def tanh_eps(seed: int, dim: int, lipschitz: float, dtype):
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(dim, 8, generator=g, dtype=torch.float64), torch.randn(8, dim, generator=g, dtype=torch.float64)
    c = torch.randn(dim, generator=g, dtype=torch.float64)
    norm = _spectral(w1) * _spectral(w2)

    def eps(x, sigma):
        return (lipschitz * math.cos(sigma) * torch.tanh(x.double() @ w1) @ w2 / norm + 0.3 * sigma * c).to(dtype)

    return eps


@PROP
@given(ladder=ladders(), seed=st.integers(0, 2 ** 31 - 1), q=st.floats(0.01, 0.5), refine=st.integers(0, 12),
       kind=st.sampled_from(["linear", "tanh"]), dtype=st.sampled_from([torch.float64, torch.float32]),
       scale=st.floats(0.1, 10.0))
def test_invert_then_regenerate_returns_the_start(ladder, seed, q, refine, kind, dtype, scale):
    steps = len(ladder) - 1
    d = max(a - b for a, b in zip(ladder, ladder[1:]))
    lipschitz = q / d
    make = linear_eps if kind == "linear" else tanh_eps
    eps = Recorder(make(seed, 6, lipschitz, dtype))
    x0 = scale * torch.randn(3, 6, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    xt = ddim.invert(eps, x0, ladder, refine_iterations=refine)
    back = ddim.regenerate(eps, xt, ladder)
    assert back.dtype == dtype and back.shape == x0.shape
    bound = q ** (refine + 1) * (1 + q) ** steps * ladder[0] * eps.max_abs
    rounding = (1e-9 if dtype == torch.float64 else 1e-4) * (1 + float(x0.abs().max()) + ladder[0] * eps.max_abs)
    err = float((back.double() - x0.double()).abs().max())
    assert err <= bound + rounding, (err, bound, rounding)


@PROP
@given(ladder=ladders(), seed=st.integers(0, 2 ** 31 - 1), q=st.floats(0.01, 0.3))
def test_refinement_converges_to_an_exact_round_trip(ladder, seed, q):
    """With enough refinement (q^(k+1) below fp64 rounding) the round trip is exact to rounding, for any ladder."""
    d = max(a - b for a, b in zip(ladder, ladder[1:]))
    eps = linear_eps(seed, 5, q / d, torch.float64)
    x0 = torch.randn(2, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k = math.ceil(math.log(1e-17) / math.log(q))
    back = ddim.regenerate(eps, ddim.invert(eps, x0, ladder, refine_iterations=k), ladder)
    assert torch.allclose(back, x0, rtol=0, atol=1e-9 * (1 + ladder[0]))


@PROP
@given(ladder=ladders(), seed=st.integers(0, 2 ** 31 - 1))
def test_constant_denoiser_telescopes_on_any_ladder(ladder, seed):
    """eps = c (a constant): inversion adds (sigma_max - sigma_min) c exactly, regeneration removes it, whatever
    the ladder (the Euler steps telescope)."""
    c = torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x0 = torch.zeros(1, 4, dtype=torch.float64)
    xt = ddim.invert(lambda x, s: c.expand_as(x), x0, ladder)
    assert torch.allclose(xt[0], (ladder[0] - ladder[-1]) * c, atol=1e-12 * (1 + ladder[0]))
    back = ddim.regenerate(lambda x, s: c.expand_as(x), xt, ladder)
    assert torch.allclose(back, x0, atol=1e-12 * (1 + ladder[0]))
