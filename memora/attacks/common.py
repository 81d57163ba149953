"""What the embedding attacks share: the model's own denoising objective on the attacker's images, the random draws
behind it, and the cost every attack node reports (model calls counted as they happen, seconds, concept images).

The objective is the one MemoRa's LoRA training uses (``memora.lora.train``): ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t)
eps`` with ``t`` uniform over the training timesteps and the mean squared error between the model's prediction and
its target (the noise, or the velocity for v-prediction models), so an attack and a LoRA training that see the same
draws compute the same loss."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from memora.lora.train import DiffusionSchedule, SampleOrder

#: the attacker's knowledge tiers of the scoreboard (issue 21), strongest first
WEIGHTS_AND_GRADIENTS = "weights+gradients"
CONCEPT_IMAGES = "concept images"
TEXT_ENCODER_ONLY = "text encoder only"
PROMPTS_ONLY = "prompts only"
KNOWLEDGE_TIERS = (WEIGHTS_AND_GRADIENTS, CONCEPT_IMAGES, TEXT_ENCODER_ONLY, PROMPTS_ONLY)

#: the columns of every attack node's cost table ("<display name>: cost", one row)
COST_COLUMNS = ["attack", "knowledge", "forward_calls", "backward_calls", "concept_images", "seconds"]

Predict = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def check_steps(steps, what: str) -> int:
    """``steps`` as an int >= 1; a ValueError naming the attack when it is 0 or negative (zero optimisation steps
    would return the initialisation and call it an attack)."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"{what}: steps must be a whole number >= 1, got {steps!r}")
    if steps < 1:
        raise ValueError(f"{what}: steps is {steps}; the attack needs at least 1 optimisation step (0 steps would "
                         f"return its untrained initialisation)")
    return steps


@dataclass
class CallCounter:
    """Counts the model's forward calls (each call of the denoiser on a batch) and backward passes (each time a
    gradient flows back into a model output), and the wall time since it was made."""

    forward_calls: int = 0
    backward_calls: int = 0
    start: float = field(default_factory=time.perf_counter)

    def wrap(self, predict: Predict) -> Predict:
        """``predict`` with every call counted, and a hook on its output that counts the backward pass through it."""
        def counted(x, t, cond):
            out = predict(x, t, cond)
            self.forward_calls += 1
            if out.requires_grad:
                out.register_hook(self._backward)
            return out

        return counted

    def _backward(self, grad):
        self.backward_calls += 1
        return None

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def cost_table(display_name: str, attack: str, knowledge: str, counter: CallCounter, concept_images: int,
               seconds: Optional[float] = None) -> dict:
    """The cost contract's score table: title ``"<display name>: cost"``, one row."""
    if knowledge not in KNOWLEDGE_TIERS:
        raise ValueError(f"knowledge must be one of {list(KNOWLEDGE_TIERS)}, got {knowledge!r}")
    secs = counter.seconds if seconds is None else float(seconds)
    return {"title": f"{display_name}: cost", "columns": list(COST_COLUMNS),
            "rows": [[attack, knowledge, int(counter.forward_calls), int(counter.backward_calls),
                      int(concept_images), round(secs, 3)]]}


@dataclass
class Draws:
    """The random draws of one optimisation step: which images, their timesteps and noise."""

    indices: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor


class DrawSource:
    """Every random draw of an attack from one seeded CPU generator in a fixed order: per step the images (a new
    random permutation of the set whenever the previous one is used up), then their timesteps, then their noise."""

    def __init__(self, n_images: int, latent_shape: tuple, num_train_timesteps: int, seed: int):
        self.generator = torch.Generator().manual_seed(int(seed))
        self.order = SampleOrder(int(n_images), self.generator)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.T = int(num_train_timesteps)

    def draw(self, batch_size: int) -> Draws:
        idx = self.order.take(int(batch_size))
        t = torch.randint(0, self.T, (int(batch_size),), generator=self.generator)
        noise = torch.randn((int(batch_size), *self.latent_shape), generator=self.generator, dtype=torch.float32)
        return Draws(idx, t, noise)


def denoising_loss(predict: Predict, schedule: DiffusionSchedule, latents: torch.Tensor, draws: Draws,
                   cond: object) -> torch.Tensor:
    """The model's own denoising loss (mean squared error to the noise, or to the velocity) on the drawn images."""
    device = latents.device
    x0 = latents[draws.indices.to(device)]
    noise, t = draws.noise.to(device), draws.timesteps.to(device)
    out = predict(schedule.add_noise(x0, noise, t), t, cond)
    return torch.nn.functional.mse_loss(out.float(), schedule.target(x0, noise, t).float())


def optimise(opt: torch.optim.Optimizer, draws: DrawSource, steps: int, batch_size: int,
             step_loss: Callable[[Draws], torch.Tensor], what: str,
             on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """The attacks' optimisation loop: per step the next draws of ``batch_size`` images, the loss
    ``step_loss(draws)``, its backward pass and one step of ``opt``. Returns the loss of every step (the loss the
    update used); a FloatingPointError naming the attack (``what``) and the step when a loss is not finite.
    ``on_step(step, loss)`` is called after each step (steps counted from 1)."""
    losses = []
    for k in range(steps):
        d = draws.draw(batch_size)
        opt.zero_grad(set_to_none=True)
        loss = step_loss(d)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{what}: the loss became {value} at step {k + 1}; lower the learning_rate")
        losses.append(value)
        if on_step is not None:
            on_step(k + 1, value)
    return losses


def check_batch_size(batch_size, what: str) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{what}: batch_size must be a whole number >= 1, got {batch_size!r}")
    return batch_size


def check_learning_rate(lr, what: str) -> float:
    lr = float(lr)
    if not (lr > 0 and lr < float("inf")):
        raise ValueError(f"{what}: learning_rate must be a finite number > 0, got {lr!r}")
    return lr


def check_optimisation(steps, learning_rate, batch_size, what: str) -> None:
    """The optimisation settings every attack recipe has: steps, learning rate, batch size (errors name ``what``)."""
    check_steps(steps, what)
    check_learning_rate(learning_rate, what)
    check_batch_size(batch_size, what)


def check_whole_number(value, name: str, low: int, high: int, what: str) -> int:
    """``value`` as a whole number in ``low..high``; a ValueError naming the attack and the setting otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what}: {name} must be a whole number in {low}..{high}, got {value!r}")
    return value
