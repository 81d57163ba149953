"""memora.flow: rectified-flow inversion / regeneration on analytic velocity fields, the time shifts, the LATENT
convention, and slerp on Flux latents (16 channels, packed or not)."""

import math

import pytest
import torch

from memora import flow
from memora import slerp as S


def _field(seed=0, dim=32, strength=0.8):
    """A smooth nonlinear, time-dependent velocity field on [batch, dim] (float64)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    c = torch.randn(dim, generator=g, dtype=torch.float64)

    def v(x, t):
        return strength * torch.tanh(x @ w) + (1.0 - t) * c - x * 0.3 * t

    return v


def _ladder(steps=20, start=6, shift=3.0):
    ts = [flow.discrete_flow_shift(1.0 - i / steps, shift) for i in range(steps)] + [0.0]
    return ts[start:]


def test_refined_inversion_is_undone_by_euler_regeneration():
    v = _field()
    x0 = torch.randn(4, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sig = _ladder()
    errors = {}
    for refine in (0, 2, 8):
        xt = flow.invert(v, x0, sig, refine)
        errors[refine] = flow.reconstruction_error(flow.regenerate(v, xt, sig), x0)
    assert errors[0] > 1e-3  # plain (explicit) Euler inversion is first-order only
    assert errors[8] < 1e-10 < errors[0]
    assert errors[8] < errors[2] < errors[0]


def test_inversion_step_is_the_backward_euler_equation():
    """One refined step solves x_b = x_a + (t_b - t_a) v(x_b, t_b): the Euler step from t_b returns x_a."""
    v = _field(seed=2)
    xa = torch.randn(3, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    xb = flow.invert(v, xa, [0.4, 0.3], refine_iterations=30)
    assert torch.allclose(xb, xa + (0.4 - 0.3) * v(xb, 0.4), atol=1e-13)
    assert torch.allclose(flow.regenerate(v, xb, [0.4, 0.3]), xa, atol=1e-13)


def test_straight_flow_is_inverted_exactly_without_refinement():
    """For the ideal rectified flow of one point (v = eps - x0 constant along the path) Euler is exact."""
    x0 = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    eps = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sig = _ladder(steps=10, start=2)
    xt = flow.invert(lambda x, t: eps - x0, x0, sig, 0)
    t0 = sig[0]
    assert torch.allclose(xt, (1 - t0) * x0 + t0 * eps, atol=1e-13)


def test_latent_convention_and_start():
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    assert torch.allclose(flow.from_latent(flow.to_latent(x, 0.7), 0.7), x, atol=1e-14)
    assert torch.allclose(flow.to_latent(x, 0.0), x)
    with pytest.raises(ValueError, match=r"start_at_step 0 starts at flow time t = 1, pure noise"):
        flow.check_start(1.0, 0)
    flow.check_start(0.99, 1)
    with pytest.raises(ValueError, match="flow times must lie in"):
        flow.check_flow_ladder([14.6, 3.0, 0.0])
    with pytest.raises(ValueError, match="strictly descending"):
        flow.check_flow_ladder([0.5, 0.5, 0.0])


def test_the_two_time_shifts_are_one_map():
    for mu in (0.5, 1.15, 1.7):
        for t in (0.01, 0.3, 0.5, 0.9, 1.0):
            assert flow.flux_shift(t, mu) == pytest.approx(flow.discrete_flow_shift(t, math.exp(mu)), rel=1e-12)
    assert flow.discrete_flow_shift(0.25, 1.0) == 0.25
    assert flow.flux_shift(0.0, 1.15) == 0.0 and flow.flux_shift(1.0, 1.15) == pytest.approx(1.0)


def test_simple_ladder_takes_an_even_stride_from_the_top():
    table = [i / 1000 for i in range(1, 1001)]
    assert flow.simple_ladder(table, 4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert len(flow.simple_ladder(table, 7)) == 8
    with pytest.raises(ValueError, match="steps must be >= 1"):
        flow.simple_ladder(table, 0)


def test_pack_unpack_round_trip_and_layout():
    x = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    p = flow.pack(x)
    assert p.shape == (2, 6, 64)
    assert torch.equal(p[0, 0, :4], x[0, 0, :2, :2].flatten())  # channel-major 2x2 patch, as Flux packs it
    assert torch.equal(flow.unpack(p, 4, 6), x)
    with pytest.raises(ValueError, match="multiples of 2"):
        flow.pack(torch.zeros(1, 16, 3, 4))


def test_slerp_on_flux_latents_needs_no_adaptation():
    """Slerp works on the whole flattened item: packing is a permutation of its entries and the flow LATENT
    convention (x_t / (1 - t)) a common scale, and slerp commutes with both, so slerping 16-channel latents, packed
    latents or the stored x_t / (1 - t) gives the same interpolants."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
    out = S.slerp_pairs(a, b, 10)
    assert out.shape == (33, 16, 8, 8)
    packed = S.slerp_pairs(flow.pack(a), flow.pack(b), 10)
    assert torch.allclose(flow.unpack(packed, 8, 8), out, atol=1e-6, rtol=0)
    scaled = S.slerp_pairs(flow.to_latent(a, 0.7), flow.to_latent(b, 0.7), 10)
    assert torch.allclose(flow.from_latent(scaled, 0.7), out, atol=1e-5, rtol=0)
    norms = out.flatten(1).norm(dim=1).reshape(3, 11)
    assert torch.all(norms[:, 1:-1] > 0.5 * norms[:, :1])  # no collapse towards 0 in the middle, as a lerp would
