"""An adversarial prompt prefix in the spirit of UnlearnDiffAtk (Zhang et al. 2024, "To Generate or Not?
Safety-Driven Unlearned Diffusion Models Are Still Easy To Generate Unsafe Images ... For Now"): optimise
``num_tokens`` tokens put in front of the prompt so that the unlearned model's own denoising loss on the target
images is minimal, the diffusion model acting as its own classifier (a low denoising loss under a prompt = the
model finds the images likely under it). No new word and no weight change: the result is a prompt.

Modes:

- ``discrete`` (the paper's setting: the attack is a text prompt). The prefix is kept as continuous vectors ``P``
  ([num_tokens, width]); every forward pass uses their projection onto the nearest vocabulary tokens (Euclidean
  distance to the token embedding table, restricted to whole-word tokens), and the gradient of the loss at the
  projected tokens updates ``P`` (a straight-through estimator, the projected-gradient scheme of PEZ, Wen et al.
  2023). The result is the projected tokens, written as text.
- ``continuous`` (a stated variant): ``P`` itself is the prefix, free in embedding space; stronger, but not a text
  prompt (its nearest tokens are reported only as a reading aid).

Torch only: the host gives ``encode(prefix_vectors) -> cond`` and ``predict(x_t, t, cond)``."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional

import torch

from memora.lora.train import DiffusionSchedule
from .common import (CallCounter, DrawSource, Predict, check_optimisation, check_whole_number, denoising_loss,
                     optimise)

WHAT = "MemoRa Adversarial Prompt"
DISCRETE = "discrete"
CONTINUOUS = "continuous"
MODES = (DISCRETE, CONTINUOUS)
_WORD = re.compile(r"^[a-z]{2,}</w>$")


@dataclass(frozen=True)
class APRecipe:
    """The attack's settings. Adam on the prefix vectors, constant learning rate; ``batch_size`` images (with their
    own timesteps and noise) per step."""

    num_tokens: int = 5
    steps: int = 40
    mode: str = DISCRETE
    learning_rate: float = 1e-2
    batch_size: int = 4
    seed: int = 0

    def validate(self) -> "APRecipe":
        check_optimisation(self.steps, self.learning_rate, self.batch_size, WHAT)
        if self.mode not in MODES:
            raise ValueError(f"{WHAT}: mode must be one of {list(MODES)}, got {self.mode!r}")
        check_whole_number(self.num_tokens, "num_tokens", 1, 32, WHAT)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def word_candidates(vocabulary: Mapping[str, int]) -> tuple[torch.Tensor, list[str]]:
    """The tokens the discrete search may use: whole lower-case ASCII words of two letters or more (``word</w>``),
    which a space-separated text gives back as the same tokens. Returns (token ids ascending, their words)."""
    pairs = sorted((i, w[:-4]) for w, i in vocabulary.items() if _WORD.match(w))
    if not pairs:
        raise ValueError(f"{WHAT}: the tokenizer's vocabulary has no whole-word tokens to search over")
    return torch.tensor([i for i, _ in pairs], dtype=torch.long), [w for _, w in pairs]


def nearest(vectors: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Row index in ``table`` of the nearest (Euclidean) row to each vector."""
    return torch.cdist(vectors.detach().float(), table.float()).argmin(dim=-1)


@dataclass
class APResult:
    vectors: torch.Tensor    # [num_tokens, width] the prefix used (projected in discrete mode), CPU fp32
    candidates: list         # index into the candidate list of each prefix token (its nearest token in continuous)
    losses: list             # one per step (the loss the update used)


def optimise_prefix(predict: Predict, encode: Callable[[torch.Tensor], object], table: torch.Tensor,
                    latents: torch.Tensor, schedule: DiffusionSchedule, recipe: APRecipe, *,
                    counter: Optional[CallCounter] = None,
                    on_step: Optional[Callable[[int, float], None]] = None) -> APResult:
    """Optimise the prefix. ``table``: the candidate tokens' embeddings ([n_candidates, width]); the prefix starts
    at ``num_tokens`` candidates drawn at random (seeded). Per step a batch of the images with uniform timesteps
    and noise (one generator seeded with ``recipe.seed``), the loss of the model conditioned on ``encode(prefix)``,
    and one Adam step on the continuous vectors."""
    recipe.validate()
    if latents.dim() < 2 or latents.shape[0] == 0:
        raise ValueError(f"{WHAT}: no target images (the latent batch is empty)")
    counter = counter if counter is not None else CallCounter()
    model = counter.wrap(predict)
    draws = DrawSource(latents.shape[0], tuple(latents.shape[1:]), schedule.num_train_timesteps, recipe.seed)
    table = table.detach().to(device=latents.device, dtype=torch.float32)
    start = torch.randint(0, table.shape[0], (recipe.num_tokens,), generator=draws.generator)
    prefix = torch.nn.Parameter(table[start.to(table.device)].clone())
    opt = torch.optim.Adam([prefix], lr=recipe.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def step_loss(d):
        if recipe.mode == DISCRETE:  # straight-through: the loss at the projected tokens, its gradient on `prefix`
            used = prefix + (table[nearest(prefix, table)] - prefix).detach()
        else:
            used = prefix
        return denoising_loss(model, schedule, latents, d, encode(used))

    losses = optimise(opt, draws, recipe.steps, recipe.batch_size, step_loss, WHAT, on_step)
    idx = nearest(prefix, table)
    final = table[idx] if recipe.mode == DISCRETE else prefix.detach()
    return APResult(vectors=final.detach().to("cpu", torch.float32).clone(), candidates=idx.tolist(), losses=losses)


def prefix_text(words: list[str], candidates: list[int]) -> str:
    """The prefix as text: the chosen words separated by spaces."""
    return " ".join(words[i] for i in candidates)
