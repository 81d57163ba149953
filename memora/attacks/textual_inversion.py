"""Textual inversion as a recovery attack (Pham et al. 2023, "Circumventing Concept Erasure Methods For
Text-to-Image Generative Models"): learn the embedding of a NEW token on images of the erased concept, with the
(unlearned) diffusion model and the text encoder frozen, by the model's own denoising objective; prompting the
unlearned model with that token then draws the concept if the erasure only cut the word, not the concept.

The loop is torch only. Its host supplies ``encode(vectors) -> cond`` (the text encoder on a template whose
placeholder token is replaced by ``vectors``, differentiable in them) and ``predict(x_t, t, cond)`` (the frozen
model); the only trainable tensor is ``vectors`` ([num_vectors, width])."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Callable, Container, Optional

import torch

from memora.lora.train import DiffusionSchedule
from .common import (CallCounter, DrawSource, Predict, check_optimisation, check_whole_number, denoising_loss,
                     optimise)

WHAT = "MemoRa Textual Inversion"
DEFAULT_TOKEN = "<memora-concept>"
DEFAULT_TEMPLATE = "a photo of {}"
PLACEHOLDER = "{}"
#: the key ComfyUI's SD1.x / SD2.x text encoders read an embedding file's vectors from (``embedding_key``)
EMBED_KEYS = ("clip_l", "clip_h", "clip_g")


@dataclass(frozen=True)
class TIRecipe:
    """Textual inversion's settings. Adam (no weight decay) on the new vectors only, constant learning rate."""

    steps: int = 300
    learning_rate: float = 5e-3
    batch_size: int = 4
    num_vectors: int = 1
    seed: int = 0

    def validate(self) -> "TIRecipe":
        check_optimisation(self.steps, self.learning_rate, self.batch_size, WHAT)
        check_whole_number(self.num_vectors, "num_vectors", 1, 16, WHAT)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def check_token(token: str, vocabulary: Container[str]) -> str:
    """The new token, stripped; ValueError when it is empty, contains whitespace, or already exists in the
    tokenizer's vocabulary (as a word, ``<token></w>``, or a piece): textual inversion learns a NEW word."""
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"{WHAT}: token is empty; expected a new word such as {DEFAULT_TOKEN!r}")
    tok = token.strip()
    if re.search(r"\s", tok):
        raise ValueError(f"{WHAT}: token {tok!r} contains whitespace; a token is one word such as {DEFAULT_TOKEN!r}")
    low = tok.lower()  # CLIP's tokenizer lower-cases its input
    for form in (low + "</w>", low):
        if form in vocabulary:
            raise ValueError(f"{WHAT}: token {tok!r} already exists in the tokenizer's vocabulary (as {form!r}); "
                             f"textual inversion learns a new word: choose one that is not in the vocabulary, "
                             f"such as {DEFAULT_TOKEN!r}")
    return tok


def check_template(template: str) -> str:
    """The prompt template: exactly one ``{}``, where the learnt token goes."""
    if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
        raise ValueError(f"{WHAT}: template must contain exactly one '{{}}' (where the learnt token goes), got "
                         f"{template!r}; e.g. {DEFAULT_TEMPLATE!r}")
    return template


def fill_template(template: str, word: str) -> str:
    """The template with ``word`` in place of ``{}``, separated from its neighbours by spaces (ComfyUI's
    ``embedding:name`` must stand as its own word), runs of spaces collapsed."""
    before, after = check_template(template).split(PLACEHOLDER)
    return re.sub(r" {2,}", " ", f"{before} {word} {after}").strip()


def init_vectors(word_vectors: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """The starting vectors from the init word's token embeddings ([k, width]): a one-token word fills every vector
    (as diffusers' textual inversion does); a k-token word gives its k vectors, repeated in turn when num_vectors >
    k, truncated when smaller."""
    if word_vectors.dim() != 2 or word_vectors.shape[0] < 1:
        raise ValueError(f"{WHAT}: init word has no token embeddings")
    reps = math.ceil(num_vectors / word_vectors.shape[0])
    return word_vectors.repeat(reps, 1)[:num_vectors].detach().to(torch.float32).clone()


@dataclass
class TIResult:
    vectors: torch.Tensor      # [num_vectors, width] fp32, CPU
    losses: list               # one per step


Encode = Callable[[torch.Tensor], object]


def train_embedding(predict: Predict, encode: Encode, init: torch.Tensor, latents: torch.Tensor,
                    schedule: DiffusionSchedule, recipe: TIRecipe, *, counter: Optional[CallCounter] = None,
                    on_step: Optional[Callable[[int, float], None]] = None) -> TIResult:
    """Learn the token's vectors: per step, a batch of the images (reshuffled each epoch), uniform timesteps and
    noise from one generator seeded with ``recipe.seed``; the frozen model's denoising loss on the conditioning
    ``encode(vectors)``; one Adam step on ``vectors`` only. ``latents``: the images in the model's latent space."""
    recipe.validate()
    if latents.dim() < 2 or latents.shape[0] == 0:
        raise ValueError(f"{WHAT}: no concept images (the latent batch is empty)")
    counter = counter if counter is not None else CallCounter()
    model = counter.wrap(predict)
    vectors = torch.nn.Parameter(init.detach().to(device=latents.device, dtype=torch.float32).clone())
    opt = torch.optim.Adam([vectors], lr=recipe.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    draws = DrawSource(latents.shape[0], tuple(latents.shape[1:]), schedule.num_train_timesteps, recipe.seed)
    losses = optimise(opt, draws, recipe.steps, recipe.batch_size,
                      lambda d: denoising_loss(model, schedule, latents, d, encode(vectors)), WHAT, on_step)
    return TIResult(vectors=vectors.detach().to("cpu", torch.float32).clone(), losses=losses)


def embedding_tensors(vectors: torch.Tensor, embed_key: str) -> dict[str, torch.Tensor]:
    """The embedding file's tensors: ``{embed_key: [num_vectors, width]}``, the key ComfyUI's text encoder reads
    (``clip_l`` for SD1.x, ``clip_h`` for SD2.x), fp32."""
    if embed_key not in EMBED_KEYS:
        raise ValueError(f"{WHAT}: unknown embedding key {embed_key!r}; expected one of {list(EMBED_KEYS)}")
    return {embed_key: vectors.detach().to("cpu", torch.float32).contiguous().clone()}
