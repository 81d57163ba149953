"""memora.attacks (torch only): textual inversion's and the adversarial prompt's loops on toy models whose answer is
known, their checks, and the cost table."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from memora.attacks import adversarial_prompt as ap
from memora.attacks import common
from memora.attacks import textual_inversion as ti
from memora.lora.train import DiffusionSchedule

SCHEDULE = DiffusionSchedule(torch.linspace(0.99, 0.01, 50))
SHAPE = (2, 2, 2)


def _toy_predict(target: torch.Tensor):
    """A 'model' whose prediction is (mean of the conditioning's rows - target), broadcast over the batch: its
    expected loss against fresh noise is smallest when the conditioning's mean equals ``target``."""
    def predict(x, t, cond):
        return (cond.mean(0) - target).view(1, *SHAPE).expand(x.shape[0], *SHAPE)

    return predict


def test_textual_inversion_learns_the_known_vector_and_counts_its_calls():
    target = torch.tensor([0.5, -0.5, 0.25, 0.0, 1.0, -1.0, 0.5, 0.75])
    latents = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(0))
    counter = common.CallCounter()
    recipe = ti.TIRecipe(steps=120, learning_rate=0.05, batch_size=4, num_vectors=2, seed=1)
    init = ti.init_vectors(torch.zeros(1, 8), 2)
    res = ti.train_embedding(_toy_predict(target), lambda v: v, init, latents, SCHEDULE, recipe, counter=counter)
    assert res.vectors.shape == (2, 8) and len(res.losses) == 120
    # the loss is (mean - target)^2 + noise: the mean of the two vectors ends near the target (1.84 away at the
    # start; constant-rate Adam on noisy gradients keeps wandering by about the learning rate). The test's time is
    # mostly torch.optim's first step importing its machinery (about 20 s on the loaded 2-core CPU).
    assert torch.linalg.vector_norm(res.vectors.mean(0) - target) < 0.3
    assert counter.forward_calls == 120 and counter.backward_calls == 120
    # same seed, same result (every draw from one seeded generator)
    short = dataclasses.replace(recipe, steps=10)
    first, again = (ti.train_embedding(_toy_predict(target), lambda v: v, init, latents, SCHEDULE, short)
                    for _ in range(2))
    assert torch.equal(again.vectors, first.vectors)


def test_discrete_prefix_projects_onto_the_best_tokens():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(12, 8, generator=g)
    latents = torch.randn(4, *SHAPE, generator=g)
    recipe = ap.APRecipe(num_tokens=3, steps=150, mode=ap.DISCRETE, learning_rate=0.1, batch_size=4, seed=0)
    counter = common.CallCounter()
    res = ap.optimise_prefix(_toy_predict(table[5]), lambda v: v, table, latents, SCHEDULE, recipe, counter=counter)
    assert res.candidates == [5, 5, 5]  # the one prefix whose mean is the target
    assert torch.equal(res.vectors, table[[5, 5, 5]])
    assert counter.forward_calls == 150 and counter.backward_calls == 150
    cont = ap.optimise_prefix(_toy_predict(table[5]), lambda v: v, table, latents, SCHEDULE,
                              ap.APRecipe(num_tokens=3, steps=150, mode=ap.CONTINUOUS, learning_rate=0.1, seed=0))
    # continuous: only the mean matters, and it moves to the target (measured 0.45 away after 150 steps)
    start = table[torch.randint(0, 12, (3,), generator=torch.Generator().manual_seed(0))].mean(0)
    assert torch.linalg.vector_norm(cont.vectors.mean(0) - table[5]) < 0.5 * torch.linalg.vector_norm(start - table[5])
    assert sum(cont.losses[-30:]) < sum(cont.losses[:30])


def test_checks_name_what_is_wrong():
    vocab = {"star</w>": 1, "photo</w>": 2, "a</w>": 3}
    assert ti.check_token(" <memora-concept> ", vocab) == "<memora-concept>"
    with pytest.raises(ValueError, match=r"token 'Star' already exists in the tokenizer's vocabulary \(as 'star</w>'\)"):
        ti.check_token("Star", vocab)
    with pytest.raises(ValueError, match="contains whitespace"):
        ti.check_token("my star", vocab)
    with pytest.raises(ValueError, match="token is empty"):
        ti.check_token("  ", vocab)
    with pytest.raises(ValueError, match="exactly one"):
        ti.check_template("a photo of {} and {}")
    assert ti.fill_template("a photo of {}.", "embedding:x") == "a photo of embedding:x ."
    with pytest.raises(ValueError, match="steps is 0"):
        ti.TIRecipe(steps=0).validate()
    with pytest.raises(ValueError, match="steps is 0"):
        ap.APRecipe(steps=0).validate()
    with pytest.raises(ValueError, match="mode must be one of"):
        ap.APRecipe(mode="greedy").validate()
    ids, words = ap.word_candidates({"star</w>": 7, "st": 8, "a</w>": 3, "photo</w>": 2, "x1</w>": 9})
    assert ids.tolist() == [2, 7] and words == ["photo", "star"]


def test_cost_table_follows_the_contract():
    c = common.CallCounter(forward_calls=3, backward_calls=2)
    t = common.cost_table("MemoRa Textual Inversion", "textual inversion", common.WEIGHTS_AND_GRADIENTS, c, 8, 1.5)
    assert t == {"title": "MemoRa Textual Inversion: cost", "columns": common.COST_COLUMNS,
                 "rows": [["textual inversion", "weights+gradients", 3, 2, 8, 1.5]]}
    with pytest.raises(ValueError, match="knowledge must be one of"):
        common.cost_table("x", "y", "everything", c, 1)
