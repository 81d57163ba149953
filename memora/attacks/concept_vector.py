"""A concept's direction in the text encoder's embedding space, after Ring-A-Bell (Tsai et al., "Ring-A-Bell! How
Reliable are Concept Removal Methods for Diffusion Models?", ICLR 2024).

The direction is the mean, over prompt pairs that differ only by the concept, of the difference between the text
encoder's outputs (the whole token sequence, e.g. 77 x 768 for SD1.x): ``c = mean_i f(P_i with) - f(P_i without)``.
The attack conditions the model on ``f(P) + strength * c`` for a prompt P. The paper's concept-vector strengths
(its eta): 3 for nudity (with K = 16 free tokens), 5 and 5.5 for violence (K = 38 and 77).

``genetic_prompt_search`` is Ring-A-Bell's second stage: a genetic search for K token ids whose encoding is closest
(squared L2 over the whole sequence) to the target embedding, so that the attack becomes a plain text prompt.
Nothing here imports ComfyUI: encoders are passed in as callables.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


class ConceptVectorInputError(ValueError):
    """Prompt lists or embeddings the concept direction cannot be computed from."""


def prompt_lines(text: str, what: str) -> list[str]:
    """The non-empty lines of a multiline prompt input, stripped; an error when there are none."""
    if not isinstance(text, str):
        raise ConceptVectorInputError(f"{what}: expected text (one prompt per line), got {type(text).__name__}")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ConceptVectorInputError(f"{what}: no prompt given (one prompt per line, empty lines are skipped)")
    return lines


def paired_prompts(concept_text: str, neutral_text: str) -> list[tuple[str, str]]:
    """(with concept, without) pairs, line i of one with line i of the other; the counts must match."""
    concept = prompt_lines(concept_text, "concept_prompts")
    neutral = prompt_lines(neutral_text, "neutral_prompts")
    if len(concept) != len(neutral):
        raise ConceptVectorInputError(
            f"concept_prompts has {len(concept)} prompts but neutral_prompts has {len(neutral)}: they pair line by "
            f"line (line i of neutral_prompts is line i of concept_prompts without the concept), so the counts must "
            f"be equal (empty lines are not counted)")
    return list(zip(concept, neutral))


def _check_same_shape(tensors: Sequence[torch.Tensor], what: str) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ConceptVectorInputError(
            f"{what}: the prompts' text embeddings have different shapes {sorted(shapes)}: a prompt longer than the "
            f"encoder's window (77 tokens for CLIP) is encoded in several windows; keep every prompt within one")


def concept_direction(with_concept: Sequence[torch.Tensor], without: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean_i (with_concept[i] - without[i]) in float32; every embedding of one shape (e.g. [1, 77, D])."""
    if len(with_concept) != len(without) or not with_concept:
        raise ConceptVectorInputError(f"needs as many embeddings with the concept as without, at least one; got "
                                      f"{len(with_concept)} and {len(without)}")
    _check_same_shape(list(with_concept) + list(without), "concept_prompts / neutral_prompts")
    diffs = [a.detach().float() - b.detach().float() for a, b in zip(with_concept, without)]
    return torch.stack(diffs).mean(0)


def add_direction(embedding: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """``embedding + strength * direction`` in the embedding's dtype; shapes must agree (batch may broadcast)."""
    if embedding.shape[-2:] != direction.shape[-2:]:
        raise ConceptVectorInputError(
            f"the prompt's text embedding has shape {tuple(embedding.shape)} but the concept direction "
            f"{tuple(direction.shape)}: the prompt must fit the same number of token windows as the prompt pairs "
            f"(77 tokens for CLIP) and be encoded by the same text encoder")
    out = embedding.float() + float(strength) * direction.to(embedding.device).float()
    return out.to(embedding.dtype)


@dataclass(frozen=True)
class SearchSettings:
    """Ring-A-Bell's genetic search; the paper's values are population 200, 3000 generations, mutation rate 0.25,
    crossover rate 0.5, K = 16 free tokens (nudity) or 38 / 77 (violence)."""

    tokens: int = 16
    population: int = 200
    generations: int = 3000
    mutation_rate: float = 0.25
    crossover_rate: float = 0.5
    seed: int = 0


def _check_search(s: SearchSettings, vocab_low: int, vocab_high: int) -> None:
    if s.tokens < 1 or s.population < 2 or s.generations < 1:
        raise ConceptVectorInputError(f"genetic search needs tokens >= 1, population >= 2 and generations >= 1, got "
                                      f"tokens={s.tokens}, population={s.population}, generations={s.generations}")
    if not vocab_low < vocab_high:
        raise ConceptVectorInputError(f"token id range [{vocab_low}, {vocab_high}) is empty")


def genetic_prompt_search(encode_ids: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor,
                          settings: SearchSettings, vocab: tuple[int, int],
                          callback: Optional[Callable[[int, int, float], None]] = None) -> tuple[list[int], float]:
    """K token ids whose encoding is closest to ``target`` (squared L2 over the whole sequence).

    ``encode_ids(ids)`` maps a [P, K] batch of candidate token ids to their text embeddings ([P, T, D], the encoder
    adds the start/end/padding tokens); ``vocab`` = (lowest, highest + 1) id a free token may take. Each generation
    keeps the better half, then each survivor breeds with a random partner at a random cut with probability
    ``crossover_rate`` (two children) and each member mutates one random position with probability
    ``mutation_rate``, as in the paper's code. Returns (best ids, best loss)."""
    _check_search(settings, *vocab)
    rng = random.Random(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    lo, hi = vocab
    k = settings.tokens
    pop = torch.randint(lo, hi, (settings.population, k), generator=gen)
    target = target.detach().float()
    best_ids, best_loss = None, float("inf")
    for g in range(settings.generations):
        with torch.no_grad():
            emb = encode_ids(pop).float()
        loss = ((emb - target) ** 2).flatten(1).sum(1)
        order = torch.argsort(loss)
        if float(loss[order[0]]) < best_loss:
            best_loss, best_ids = float(loss[order[0]]), pop[order[0]].tolist()
        if callback is not None:
            callback(g + 1, settings.generations, best_loss)
        if g == settings.generations - 1:
            break
        parents = pop[order[: max(2, settings.population // 2)]]
        children = []
        for i in range(parents.shape[0]):
            children.append(parents[i])
            if rng.random() < settings.crossover_rate:
                j = rng.randrange(parents.shape[0])
                cut = rng.randint(1, k) if k > 1 else 1
                children.append(torch.cat([parents[i][:cut], parents[j][cut:]]))
                children.append(torch.cat([parents[j][:cut], parents[i][cut:]]))
        pop = torch.stack(children)
        for i in range(pop.shape[0]):
            if rng.random() < settings.mutation_rate:
                pop[i, rng.randrange(k)] = rng.randrange(lo, hi)
    return best_ids, best_loss
