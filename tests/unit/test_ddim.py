"""DDIM inversion/regeneration on deterministic toy denoisers (no ComfyUI)."""

import math

import pytest
import torch

from memora import ddim, schedule


def toy_eps(weight_seed=0, dim=16):
    """A smooth nonlinear 'denoiser' in VE coordinates: eps depends on the VP input and on sigma."""
    g = torch.Generator().manual_seed(weight_seed)
    w1 = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    w2 = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)

    def eps_fn(x, sigma):
        x_in = x / math.sqrt(1.0 + sigma * sigma)
        t = math.log(sigma)
        h = torch.tanh(x_in.to(torch.float64) @ w1 + 0.1 * t)
        return (0.5 * x_in.to(torch.float64) + 0.5 * h @ w2).to(x.dtype)

    return eps_fn


def test_leading_timesteps_and_reference_plan_match_memora_reference():
    ts = schedule.leading_timesteps(1000, 50)
    assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50
    plan = schedule.reference_plan(1000, 50, 15)
    assert plan.keep_timestep == 661
    assert plan.start_timestep == 681
    assert plan.inversion_targets[0] == 21 and plan.inversion_targets[-1] == 661
    assert len(plan.regeneration) == 35
    assert plan.regeneration[-1] == (1, 1) and plan.regeneration[-2] == (21, 1)
    # The full reference run records 48 latents (21..961): start_step 0 keeps the last one.
    assert len(schedule.reference_plan(1000, 50, 0).inversion_targets) == 48
    with pytest.raises(ValueError, match="start_at_step"):
        schedule.reference_plan(1000, 50, 49)


def test_sd_schedule_from_sigmas_roundtrip():
    ab = schedule.scaled_linear_alphas_cumprod()
    sig = schedule.sigmas_from_alphas_cumprod(ab)
    assert torch.allclose(schedule.alphas_cumprod_from_sigmas(sig), ab, rtol=1e-12)
    assert abs(float((1 - ab[1]).sqrt()) - 0.041) < 1e-3  # the reference's residual noise at t = 1


def test_exact_inversion_then_regeneration_reconstructs_and_refinement_converges():
    ab = schedule.scaled_linear_alphas_cumprod()
    sig = schedule.sigmas_from_alphas_cumprod(ab)
    ts = schedule.leading_timesteps(1000, 20)[10:]
    ladder = [float(sig[t]) for t in ts] + [0.0]
    eps_fn = toy_eps()
    x0 = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errs = []
    for refine in (0, 1, 3, 8):
        xt = ddim.invert(eps_fn, x0, ladder, refine_iterations=refine)
        assert not torch.equal(xt, x0)
        rec = ddim.regenerate(eps_fn, xt, ladder)
        errs.append(float((rec - x0).norm() / x0.norm()))
    print("toy reconstruction error by refine_iterations 0/1/3/8:", ", ".join(f"{e:.2e}" for e in errs))
    assert errs[0] < 1e-1
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 1e-8


def _independent_reference(eps_vp, x0, ab, steps, start):
    """fp64 re-derivation of the reference arithmetic straight from docs/method.md steps 3-6."""
    stride = 1000 // steps
    timesteps = list(range(1, 1000, stride))[:steps]  # 1, 21, ..., 981
    x = x0.clone()
    t_cur = 1
    kept = None
    keep_t = 961 - stride * start if steps == 50 else timesteps[-2] - stride * start
    for t in timesteps[1:-1]:
        e = eps_vp(x, t)
        x = (x - (1 - ab[t_cur]).sqrt() * e) * ab[t].sqrt() / ab[t_cur].sqrt() + (1 - ab[t]).sqrt() * e
        t_cur = t
        if t == keep_t:
            kept = x.clone()
    x = kept
    for t in list(reversed(timesteps))[start:]:
        prev = t - stride if t - stride >= 1 else 1
        e = eps_vp(x, t)
        x0p = (x - (1 - ab[t]).sqrt() * e) / ab[t].sqrt()
        x = ab[prev].sqrt() * x0p + (1 - ab[prev]).sqrt() * e
    return kept, x


def test_reference_schedule_matches_independent_fp64_implementation():
    ab = schedule.scaled_linear_alphas_cumprod()
    eps_fn = toy_eps(3)

    def eps_vp(x_vp, t):
        a = float(ab[t])
        return eps_fn(x_vp / math.sqrt(a), math.sqrt((1 - a) / a))

    x0 = torch.randn(2, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    plan = schedule.reference_plan(1000, 50, 15)
    kept_ref, regen_ref = _independent_reference(eps_vp, x0, ab, 50, 15)
    kept = ddim.reference_invert(eps_fn, x0, ab, plan)
    regen = ddim.reference_regenerate(eps_fn, kept, ab, plan)
    e1 = float((kept - kept_ref).norm() / kept_ref.norm())
    e2 = float((regen - regen_ref).norm() / regen_ref.norm())
    print(f"reference parity: inversion {e1:.2e}, regeneration {e2:.2e}")
    assert e1 < 1e-6 and e2 < 1e-6


def test_regenerate_equals_euler_step_formula():
    eps_fn = toy_eps(5)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = ddim.regenerate(eps_fn, x, [2.0, 0.5])
    assert torch.allclose(out, x + (0.5 - 2.0) * eps_fn(x, 2.0))


def test_bad_ladders_rejected():
    with pytest.raises(ValueError, match="descending"):
        ddim.regenerate(toy_eps(), torch.zeros(1, 16), [0.0, 1.0])
    with pytest.raises(ValueError, match="at least two"):
        ddim.invert(toy_eps(), torch.zeros(1, 16), [1.0])
    with pytest.raises(ValueError, match="refine_iterations"):
        ddim.invert(toy_eps(), torch.zeros(1, 16), [1.0, 0.0], refine_iterations=-1)
