"""The method side of the training-free attacks (memora/attacks: concept_vector, probes), without ComfyUI: prompt
pairing, the concept direction, the genetic prompt search on a toy encoder, DDIM with eta and injected noise, and
the inpainting masks."""

from __future__ import annotations

import math

import pytest
import torch

from memora import ddim, schedule
from memora.attacks import concept_vector as cv
from memora.attacks import probes


def test_prompt_pairs_must_match_line_by_line():
    pairs = cv.paired_prompts("a star\n\n  a big star  \n", "a circle\na big circle")
    assert pairs == [("a star", "a circle"), ("a big star", "a big circle")]
    with pytest.raises(cv.ConceptVectorInputError, match="concept_prompts has 2 prompts but neutral_prompts has 1"):
        cv.paired_prompts("a\nb", "c")
    with pytest.raises(cv.ConceptVectorInputError, match="neutral_prompts: no prompt given"):
        cv.paired_prompts("a", " \n ")


def test_concept_direction_is_the_mean_difference_and_checks_shapes():
    a = [torch.full((1, 3, 2), 2.0), torch.full((1, 3, 2), 4.0)]
    b = [torch.zeros(1, 3, 2), torch.ones(1, 3, 2)]
    d = cv.concept_direction(a, b)
    assert torch.equal(d, torch.full((1, 3, 2), 2.5))
    shifted = cv.add_direction(torch.ones(1, 3, 2), d, 2.0)
    assert torch.equal(shifted, torch.full((1, 3, 2), 6.0))
    with pytest.raises(cv.ConceptVectorInputError, match="different shapes"):
        cv.concept_direction([torch.zeros(1, 3, 2)], [torch.zeros(1, 6, 2)])
    with pytest.raises(cv.ConceptVectorInputError, match="token windows"):
        cv.add_direction(torch.zeros(1, 6, 2), d, 1.0)


def test_genetic_search_gets_close_to_a_reachable_target():
    """A toy 'encoder' (a fixed embedding table, mean over positions plus per-position terms): the target is the
    encoding of known ids, so the optimum loss is 0; the search must end far below the random population's best."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(50, 4, generator=gen)

    def encode_ids(ids):
        return table[ids]  # [P, K, 4]

    target = encode_ids(torch.tensor([[3, 17, 42]]))[0]
    start = ((encode_ids(torch.randint(1, 50, (200, 3), generator=torch.Generator().manual_seed(0))) - target) ** 2
             ).flatten(1).sum(1).min()
    ids, loss = cv.genetic_prompt_search(encode_ids, target, cv.SearchSettings(tokens=3, population=40,
                                                                               generations=60, seed=1), (1, 50))
    assert len(ids) == 3 and all(1 <= i < 50 for i in ids)
    assert loss < 0.25 * float(start)
    assert ids == [3, 17, 42] or loss > 0  # the loss reported is the ids' own
    assert loss == pytest.approx(float(((encode_ids(torch.tensor([ids]))[0] - target) ** 2).sum()), rel=1e-6)
    with pytest.raises(cv.ConceptVectorInputError, match="generations >= 1"):
        cv.genetic_prompt_search(encode_ids, target, cv.SearchSettings(generations=0), (1, 50))


def test_inject_steps_parsing():
    assert probes.parse_inject_steps("5, 10 5", 20) == (5, 10)
    assert probes.parse_inject_steps("", 20) == ()
    with pytest.raises(probes.ProbeInputError, match=r"step 20 is out of range: with steps=20 .* 0\.\.19"):
        probes.parse_inject_steps("3,20", 20)
    with pytest.raises(probes.ProbeInputError, match="'x' is not a whole number"):
        probes.parse_inject_steps("3,x", 20)


def _toy_eps(x, sigma):
    return torch.tanh(x) * 0.5 + 0.1 * sigma


def test_noisy_ddim_without_noise_is_ddim_and_eta_one_is_ddpm():
    sig = schedule.sigmas_from_alphas_cumprod(schedule.scaled_linear_alphas_cumprod())
    ladder = [float(sig[t]) for t in schedule.leading_timesteps(1000, 10)] + [0.0]
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * ladder[0]
    assert torch.equal(probes.noisy_ddim(_toy_eps, x, ladder), ddim.regenerate(_toy_eps, x, ladder))
    # eta 1: the fresh noise's variance is DDPM's posterior variance (VP), scaled to VE coordinates
    sa, sb = ladder[3], ladder[4]
    ab_t, ab_p = 1 / (1 + sa * sa), 1 / (1 + sb * sb)
    ddpm_var_vp = (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
    down, up = probes.ancestral_split(sa, sb, 1.0)
    assert up * up == pytest.approx(ddpm_var_vp / ab_p, rel=1e-9)
    assert down * down + up * up == pytest.approx(sb * sb, rel=1e-9)
    # eta above 1 on a large step: more noise than the level, no deterministic direction left
    down, up = probes.ancestral_split(2.0, 0.5, 1.9)
    assert down == 0.0 and up > 0.5
    assert probes.ancestral_split(1.0, 0.0, 1.5) == (0.0, 0.0)


def test_noisy_ddim_injects_noise_at_the_chosen_step_only():
    ladder = [4.0, 2.0, 1.0, 0.5, 0.0]
    x = torch.ones(1, 1, 2, 2)
    draws = []

    def noise_fn(shape):
        z = torch.full(tuple(shape), 1.0)
        draws.append(z)
        return z

    plain = probes.noisy_ddim(_toy_eps, x, ladder)
    hit = probes.noisy_ddim(_toy_eps, x, ladder, 0.0, (2,), 0.5, noise_fn)
    assert len(draws) == 1 and not torch.equal(plain, hit)
    # the same as running plain DDIM to step 2, adding 0.5 * sigma_2 * z there, and continuing
    mid = ddim.regenerate(_toy_eps, x, ladder[:3]) + 0.5 * ladder[2]
    assert torch.allclose(hit, ddim.regenerate(_toy_eps, mid, ladder[2:]), atol=1e-6)
    with pytest.raises(probes.ProbeInputError, match="noise_fn is required"):
        probes.noisy_ddim(_toy_eps, x, ladder, 0.5)


@pytest.mark.parametrize("kind,fraction,expected", [("centre", 0.25, 0.25), ("centre", 0.5, 36 / 64),
                                                    ("left half", 0.5, 0.5), ("top half", 0.25, 0.25)])
def test_masks_on_the_vae_grid(kind, fraction, expected):
    m = probes.make_mask(kind, fraction, 3, 32, 32, cell=4)
    assert m.shape == (3, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert float(m[0].mean()) == pytest.approx(expected)
    # constant on each 4 x 4 cell: exact in latent space
    cells = m.reshape(3, 8, 4, 8, 4)
    assert torch.equal(cells.amax((2, 4)), cells.amin((2, 4)))
    if kind == "left half":
        assert float(m[:, :, :16].mean()) == 1.0 and float(m[:, :, 16:].mean()) == 0.0


def test_random_boxes_reach_the_fraction_and_follow_the_seed():
    a = probes.make_mask("random boxes", 0.3, 4, 32, 32, cell=4, seed=5)
    b = probes.make_mask("random boxes", 0.3, 4, 32, 32, cell=4, seed=5)
    assert torch.equal(a, b)
    share = a.flatten(1).mean(1)
    assert bool((share >= 0.3).all()) and bool((share < 0.3 + 4 / 64 + 1e-9).all())
    assert not torch.equal(a, probes.make_mask("random boxes", 0.3, 4, 32, 32, cell=4, seed=6))


def test_bad_masks_are_refused():
    with pytest.raises(probes.ProbeInputError, match="mask_kind must be one of"):
        probes.make_mask("bottom", 0.5, 1, 32, 32)
    with pytest.raises(probes.ProbeInputError, match="between 0 and 1"):
        probes.make_mask("centre", 1.0, 1, 32, 32)
    with pytest.raises(probes.ProbeInputError, match="masks the whole image"):
        probes.make_mask("left half", 0.99, 1, 8, 8, cell=4)
    with pytest.raises(probes.ProbeInputError, match="not a multiple of the mask grid 4"):
        probes.make_mask("centre", 0.5, 1, 30, 32, cell=4)


def test_composite_keeps_the_unmasked_pixels():
    orig = torch.rand(2, 8, 8, 3)
    filled = torch.rand(2, 8, 8, 3)
    m = probes.make_mask("left half", 0.5, 2, 8, 8)
    out = probes.composite(orig, filled, m)
    assert torch.equal(out[:, :, 4:], orig[:, :, 4:]) and torch.equal(out[:, :, :4], filled[:, :, :4])
    assert math.isclose(float(m.mean()), 0.5)
