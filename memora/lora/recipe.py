"""The MemoRa LoRA recipe: every hyperparameter of the reference training, named and documented.

The reference (gmum/MemoRa) trains with diffusers' ``train_text_to_image_lora.py``; its settings are the defaults
here (docs/method.md, step 7):

- LoRA on the UNet attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every attention (self and
  cross); rank 4, alpha 4 (scale alpha / rank = 1); ``A`` (lora_down) ~ N(0, (1/rank)^2), ``B`` (lora_up) = 0, so the
  untrained LoRA changes nothing;
- loss: mean squared error between the model output and its target: the noise (epsilon) for epsilon-prediction
  models, the velocity ``sqrt(ab) * eps - sqrt(1 - ab) * x0`` for v-prediction models; t uniform over the training
  timesteps, no SNR weighting;
- AdamW, lr 1e-4, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8; cosine decay from lr to 0 over the optimizer
  updates with no warm-up (or a constant lr); gradient norm clipped to 1.0;
- batch 1 with gradient accumulation 4 (effective batch 4); random horizontal flip with p = 0.5; seed 2024.

Torch only (no ComfyUI import)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Iterable

ATTENTION = "attention"
ATTENTION_FF = "attention+feedforward"
ALL_LINEAR_CONV = "all linear+conv"
TARGETS = (ATTENTION, ATTENTION_FF, ALL_LINEAR_CONV)

COSINE = "cosine"
CONSTANT = "constant"
LR_SCHEDULES = (COSINE, CONSTANT)

# Module paths (ldm/ComfyUI or diffusers spelling: both name these layers the same way).
_ATTENTION_RE = re.compile(r"(^|\.)attn\d*\.(to_q|to_k|to_v|to_out\.0)$")
_FEEDFORWARD_RE = re.compile(r"(^|\.)ff\.net\.(0\.proj|2)$")


@dataclass(frozen=True)
class LoRARecipe:
    """One LoRA training run. Defaults are the MemoRa reference's (see the module docstring).

    steps: optimizer updates (the reference README: 500).
    rank, alpha: LoRA rank and alpha; the delta is ``alpha / rank * up @ down``.
    learning_rate, lr_schedule: AdamW peak learning rate; "cosine" decays to 0 over ``schedule_steps`` updates (no
        warm-up), "constant" keeps it.
    schedule_steps: the length of the learning-rate schedule; 0 (the default) means ``steps``. A run of N updates
        with ``schedule_steps=T`` (T >= N) is the first N updates of the T-update run with the same seed: what a
        snapshot of that run at N updates holds, bit for bit (every draw comes from one generator in update order,
        and nothing else depends on the run's length).
    betas, weight_decay, adam_eps: AdamW settings.
    max_grad_norm: gradient norm clipping over all LoRA parameters (<= 0 disables it).
    batch_size, gradient_accumulation: samples per forward pass and forward passes per update; an update sees
        ``batch_size * gradient_accumulation`` samples and its gradient is their mean (the same as one big batch).
    random_flip, flip_probability: horizontal flip of each sample, drawn independently per sample.
    targets: which layers get a LoRA: "attention" (to_q, to_k, to_v, to_out.0), "attention+feedforward" (also
        ff.net.0.proj and ff.net.2), "all linear+conv" (every Linear and Conv layer of the UNet).
    seed: seeds the one generator behind every random draw (LoRA init, sample order, flips, timesteps, noise).
    """

    steps: int = 500
    rank: int = 4
    alpha: float = 4.0
    learning_rate: float = 1e-4
    lr_schedule: str = COSINE
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 1
    gradient_accumulation: int = 4
    random_flip: bool = True
    flip_probability: float = 0.5
    targets: str = ATTENTION
    seed: int = 2024
    schedule_steps: int = 0

    # -- derived values ------------------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The LoRA scale alpha / rank (1.0 for the reference's 4 / 4)."""
        return float(self.alpha) / int(self.rank)

    @property
    def init_std(self) -> float:
        """Standard deviation of lora_down at initialisation: 1 / rank (peft's "gaussian" init)."""
        return 1.0 / int(self.rank)

    @property
    def samples_per_update(self) -> int:
        return int(self.batch_size) * int(self.gradient_accumulation)

    @property
    def schedule_length(self) -> int:
        """The number of updates the learning-rate schedule spans: ``schedule_steps``, or ``steps`` when that is 0."""
        return int(self.schedule_steps) or int(self.steps)

    def lr_at(self, update: int) -> float:
        """The learning rate used by optimizer update ``update`` (0-based).

        cosine: ``lr * 0.5 * (1 + cos(pi * k / T))`` with T = :attr:`schedule_length` (diffusers' cosine schedule, 0
        warm-up steps, 0.5 cycles): the first update uses the full lr, update T - 1 uses
        ``lr * 0.5 * (1 + cos(pi * (T - 1) / T))``, and the value after it would be 0."""
        if self.lr_schedule == CONSTANT:
            return float(self.learning_rate)
        total = self.schedule_length
        k = min(max(int(update), 0), total)
        return float(self.learning_rate) * 0.5 * (1.0 + math.cos(math.pi * k / total))

    # -- validation ----------------------------------------------------------------------------------------------
    def validate(self) -> "LoRARecipe":
        """Raise ValueError saying what is wrong and what is expected; return self when every value is usable."""
        def integer(name, v, lo):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")

        integer("steps", self.steps, 1)
        integer("rank", self.rank, 1)
        integer("batch_size", self.batch_size, 1)
        integer("gradient_accumulation", self.gradient_accumulation, 1)
        integer("seed", self.seed, 0)
        integer("schedule_steps", self.schedule_steps, 0)
        if self.schedule_steps and self.schedule_steps < self.steps:
            raise ValueError(f"schedule_steps must be 0 (the schedule spans the {self.steps} updates) or at least "
                             f"steps ({self.steps}), got {self.schedule_steps}: a schedule cannot end before training")
        for name in ("alpha", "learning_rate", "weight_decay", "adam_eps", "max_grad_norm", "flip_probability"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0 (the LoRA scale is alpha / rank), got {self.alpha}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.adam_eps <= 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")
        if len(tuple(self.betas)) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {list(TARGETS)}, got {self.targets!r}")
        return self

    # -- records -------------------------------------------------------------------------------------------------
    def as_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d.update({"loss": "mse", "timesteps": "uniform", "optimizer": "AdamW",
                  "lora_init": "down ~ N(0, (1/rank)^2), up = 0", "lr_warmup_steps": 0})
        return d

    def to_json(self) -> str:
        """Deterministic JSON of every setting (sorted keys): what a saved file's metadata records."""
        return json.dumps(self.as_dict(), sort_keys=True)


# -- snapshots ---------------------------------------------------------------------------------------------------
SNAPSHOT_TAG = "_step"
_SNAPSHOT_RE = re.compile(r"_step(\d+)_\d+_\.safetensors$")


def parse_snapshot_steps(text: str, steps: int) -> tuple[int, ...]:
    """The update counts of ``snapshot_steps`` ("25,50,100"; empty or blank: none), sorted. ValueError naming the
    entry when one is not a whole number, is below 1, is beyond ``steps`` (the training length) or appears twice."""
    if text is None or not str(text).strip():
        return ()
    out: list[int] = []
    for i, raw in enumerate(str(text).split(",")):
        item = raw.strip()
        if not item:
            raise ValueError(f"snapshot_steps {text!r}: entry {i + 1} is empty; expected update counts separated by "
                             f"commas, like '25,50,100'")
        try:
            n = int(item, 10)
        except ValueError:
            raise ValueError(f"snapshot_steps {text!r}: {item!r} is not a whole number of updates; expected update "
                             f"counts separated by commas, like '25,50,100'") from None
        if n < 1:
            raise ValueError(f"snapshot_steps {text!r}: {n} is not a number of updates (each must be >= 1; the "
                             f"untrained model is the point at 0 updates, no LoRA needed)")
        if n > int(steps):
            raise ValueError(f"snapshot_steps {text!r}: {n} is beyond the training length (steps = {steps}); raise "
                             f"steps to at least {n} or drop it")
        if n in out:
            raise ValueError(f"snapshot_steps {text!r}: {n} appears more than once; give each update count once")
        out.append(n)
    return tuple(sorted(out))


def snapshot_save_name(save_name: str, step: int) -> str:
    """The save prefix of the snapshot at ``step`` updates: ``<save_name>_step<step>`` (the file is then
    ``<save_name>_step<step>_<counter>_.safetensors``, next to the final ``<save_name>_<counter>_.safetensors``)."""
    return f"{save_name.strip()}{SNAPSHOT_TAG}{int(step)}"


def snapshot_step_of(filename: str):
    """The update count of a snapshot file named by :func:`snapshot_save_name` (None for any other file)."""
    m = _SNAPSHOT_RE.search(str(filename))
    return int(m.group(1)) if m else None


# -- layer selection ---------------------------------------------------------------------------------------------
def is_target(module_path: str, kind: str, targets: str) -> bool:
    """Whether a layer gets a LoRA. ``module_path``: its dotted path (ComfyUI/ldm or diffusers spelling);
    ``kind``: "linear" or "conv" (anything else never does)."""
    if kind not in ("linear", "conv"):
        return False
    if targets == ALL_LINEAR_CONV:
        return True
    if _ATTENTION_RE.search(module_path):
        return True
    if targets == ATTENTION_FF and _FEEDFORWARD_RE.search(module_path):
        return True
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {list(TARGETS)}, got {targets!r}")
    return False


def lora_shapes(weight_shape: Iterable[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lora_down shape, lora_up shape) for a layer weight: Linear [out, in] -> [r, in], [out, r];
    Conv [out, in, *k] -> [r, in, *k], [out, r, 1, ...] (the kohya convention)."""
    shape = tuple(int(s) for s in weight_shape)
    if len(shape) < 2:
        raise ValueError(f"a LoRA needs a weight with at least 2 dimensions, got shape {shape}")
    down = (int(rank), *shape[1:])
    up = (shape[0], int(rank), *([1] * (len(shape) - 2)))
    return down, up


def lora_parameter_count(weight_shapes: Iterable[Iterable[int]], rank: int) -> int:
    """Trainable parameters of a LoRA over these layer weights: sum of rank * (fan_in + out) per layer
    (SD1.x attention: 128 layers, 797,184 parameters at rank 4)."""
    total = 0
    for s in weight_shapes:
        down, up = lora_shapes(s, rank)
        total += math.prod(down) + math.prod(up)
    return total
