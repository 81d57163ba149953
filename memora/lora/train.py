"""LoRA training with the MemoRa recipe over an abstract model call (torch only, no ComfyUI).

The loop needs three things from its host:

- ``predict(x_t, t, cond) -> model output``: the model WITH the LoRA applied, called on variance-preserving noisy
  latents ``x_t = sqrt(ab[t]) * x0 + sqrt(1 - ab[t]) * eps`` (diffusers' / the reference's coordinates) at integer
  training timesteps ``t`` ([batch] long tensor); it returns what the model predicts (epsilon or velocity, see
  :class:`DiffusionSchedule`);
- the LoRA layers (:class:`LoRALayerParams`, one per target layer), which the host adds to its weights: through
  :func:`attach_lora` for a plain torch module (weight parametrisation), or through ComfyUI weight wrappers
  (``memora.lora.apply.LoraWeightWrapper``, installed by ``nodes/_lora_host.py``); either way the weight used is ``W + alpha / rank * up @ down``;
- the training latents, already in the model's latent space (for SD1.x: VAE latents x 0.18215).

Every random draw comes from ONE ``torch.Generator`` on the CPU, in a fixed order: the LoRA init (layers in sorted
name order), then per optimizer update the sample indices (a new random permutation of the data set whenever the
previous one is used up, like a shuffled DataLoader), the flips, the timesteps and the noise for all the samples of
the update at once, which the gradient-accumulation micro-batches then split. So the same inputs and seed give
bit-identical LoRA weights on the CPU, and ``batch_size=1, gradient_accumulation=4`` sees exactly the samples,
timesteps and noise of ``batch_size=4, gradient_accumulation=1`` (same gradient up to float summation order)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch

from .apply import lora_delta
from .formats import LoraLayer
from .recipe import LoRARecipe, is_target, lora_shapes, parse_snapshot_steps

EPSILON = "epsilon"
V_PREDICTION = "v_prediction"
PREDICTION_TYPES = (EPSILON, V_PREDICTION)


# -- LoRA parameters ---------------------------------------------------------------------------------------------
class LoRALayerParams(torch.nn.Module):
    """The trainable LoRA of one layer: ``down`` (A, [r, in, *k]) and ``up`` (B, [out, r, 1, ...]), always fp32.

    Initialised as the recipe says: down ~ N(0, init_std^2) drawn from ``generator`` (on the CPU, then moved to
    ``device``), up = 0, so the untrained LoRA adds exactly nothing."""

    def __init__(self, weight_shape: Iterable[int], rank: int, alpha: float, *, generator: torch.Generator,
                 init_std: Optional[float] = None, device: torch.device | str = "cpu"):
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        down_shape, up_shape = lora_shapes(self.weight_shape, rank)
        std = float(init_std) if init_std is not None else 1.0 / int(rank)
        down = torch.randn(down_shape, generator=generator, dtype=torch.float32) * std
        self.down = torch.nn.Parameter(down.to(device))
        self.up = torch.nn.Parameter(torch.zeros(up_shape, dtype=torch.float32, device=device))
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """``alpha / rank * up @ down`` shaped like the layer weight, computed in fp32 (autocast off)."""
        with torch.autocast(device_type=self.down.device.type, enabled=False):
            return lora_delta(self.up, self.down, self.scale, self.weight_shape)

    def to_layer(self) -> LoraLayer:
        """A detached CPU copy in the formats module's representation (kohya down / up / alpha)."""
        return LoraLayer(down=self.down.detach().to("cpu", torch.float32).clone(),
                         up=self.up.detach().to("cpu", torch.float32).clone(), alpha=self.alpha)

    @property
    def num_params(self) -> int:
        return self.down.numel() + self.up.numel()


def create_lora_layers(weight_shapes: Mapping[str, Iterable[int]], recipe: LoRARecipe, generator: torch.Generator,
                       device: torch.device | str = "cpu") -> dict[str, LoRALayerParams]:
    """One :class:`LoRALayerParams` per layer, initialised in sorted name order (so the draws do not depend on the
    order the host lists its layers in)."""
    return {name: LoRALayerParams(weight_shapes[name], recipe.rank, recipe.alpha, generator=generator,
                                  init_std=recipe.init_std, device=device)
            for name in sorted(weight_shapes)}


def lora_parameters(layers: Mapping[str, LoRALayerParams]) -> list[torch.nn.Parameter]:
    return [p for name in sorted(layers) for p in (layers[name].down, layers[name].up)]


def layer_kind(module: torch.nn.Module) -> Optional[str]:
    """"linear" for Linear layers, "conv" for Conv1d/2d/3d (ComfyUI's ops subclass these), else None."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return "conv"
    return None


def find_target_layers(module: torch.nn.Module, targets: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{module path: weight shape} of the layers of ``module`` that the recipe's ``targets`` select."""
    out = {}
    for name, m in module.named_modules():
        kind = layer_kind(m)
        w = getattr(m, "weight", None)
        if kind is None or not isinstance(w, torch.Tensor) or w.dim() < 2:
            continue
        if is_target(name, kind, targets):
            out[prefix + name] = tuple(w.shape)
    return out


class _AddLoRA(torch.nn.Module):
    def __init__(self, layer: LoRALayerParams):
        super().__init__()
        self.layer = layer

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.layer.delta().to(weight.dtype)


@contextlib.contextmanager
def attach_lora(model: torch.nn.Module, layers: Mapping[str, LoRALayerParams]) -> Iterator[torch.nn.Module]:
    """Apply LoRA layers to a plain torch module for the duration of the block (a weight parametrisation: the
    stored weights are not changed and are restored exactly, the LoRA parameters receive gradients)."""
    from torch.nn.utils import parametrize

    done = []
    try:
        for name in sorted(layers):
            mod = model.get_submodule(name)
            parametrize.register_parametrization(mod, "weight", _AddLoRA(layers[name]), unsafe=True)
            done.append(mod)
        yield model
    finally:
        for mod in reversed(done):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)


# -- the diffusion objective ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusionSchedule:
    """The training noise schedule and what the model predicts.

    ``alphas_cumprod``: alpha_bar for each training timestep (ascending t). ``prediction_type``: "epsilon" (target =
    the noise) or "v_prediction" (target = ``sqrt(ab) * eps - sqrt(1 - ab) * x0``)."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = EPSILON

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        ab = self.alphas_cumprod
        if not isinstance(ab, torch.Tensor) or ab.dim() != 1 or ab.numel() < 1:
            raise ValueError("alphas_cumprod must be a non-empty 1-D tensor")
        if not torch.isfinite(ab).all() or (ab <= 0).any() or (ab > 1).any():
            raise ValueError("alphas_cumprod must lie in (0, 1]")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def draw_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n integer training timesteps, uniform over the schedule."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def stratified_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n timesteps, one per equal slice of [0, T), shuffled (a low-variance fixed evaluation)."""
        T = self.num_train_timesteps
        edges = torch.linspace(0, T, n + 1)
        t_all = (edges[:-1] + torch.rand(n, generator=generator) * (edges[1:] - edges[:-1])).long().clamp(0, T - 1)
        return t_all[torch.randperm(n, generator=generator)]

    def _coefs(self, t: torch.Tensor, like: torch.Tensor):
        ab = self.alphas_cumprod.to(torch.float64)[t.cpu()]
        shape = (-1,) + (1,) * (like.dim() - 1)
        a = ab.sqrt().to(device=like.device, dtype=torch.float32).view(shape)
        s = (1.0 - ab).sqrt().to(device=like.device, dtype=torch.float32).view(shape)
        return a, s

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._coefs(t, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == EPSILON:
            return noise
        a, s = self._coefs(t, x0)
        return a * noise - s * x0


# -- data --------------------------------------------------------------------------------------------------------
def prepare_dataset(latents: torch.Tensor, random_flip: bool) -> torch.Tensor:
    """The training set as one fp32 tensor, prepared once: with random_flip, the horizontally flipped copies follow
    the originals (item i flipped is item i + N), so a flip is an index, not a per-step copy."""
    x = latents.detach().to(torch.float32)
    if random_flip:
        x = torch.cat([x, x.flip(-1)], dim=0)
    return x.contiguous()


class SampleOrder:
    """Dataset indices in random order, one fresh permutation per epoch (a shuffled DataLoader), drawn from the
    shared generator when the previous permutation is used up."""

    def __init__(self, n: int, generator: torch.Generator):
        if n < 1:
            raise ValueError("the training set is empty")
        self.n = int(n)
        self.generator = generator
        self._perm = torch.empty(0, dtype=torch.long)
        self.epochs = 0

    def take(self, k: int) -> torch.Tensor:
        parts = []
        need = int(k)
        while need > 0:
            if self._perm.numel() == 0:
                self._perm = torch.randperm(self.n, generator=self.generator)
                self.epochs += 1
            parts.append(self._perm[:need])
            need -= parts[-1].numel()
            self._perm = self._perm[parts[-1].numel():]
        return torch.cat(parts)


@dataclass
class UpdateDraws:
    """The random draws of one optimizer update (all its samples)."""

    indices: torch.Tensor   # [n] dataset items (before flipping)
    flips: torch.Tensor     # [n] bool
    timesteps: torch.Tensor  # [n] long
    noise: torch.Tensor     # [n, *latent shape] fp32 (CPU)


def draw_update(order: SampleOrder, generator: torch.Generator, n: int, latent_shape: tuple, recipe: LoRARecipe,
                num_train_timesteps) -> UpdateDraws:
    """The draws of one update. ``num_train_timesteps``: an int (uniform integer timesteps) or a schedule with
    ``draw_timesteps(n, generator)`` (a :class:`DiffusionSchedule` draws the same; a flow schedule its times)."""
    indices = order.take(n)
    if recipe.random_flip:
        flips = torch.rand(n, generator=generator) < recipe.flip_probability
    else:
        flips = torch.zeros(n, dtype=torch.bool)
    if isinstance(num_train_timesteps, int):
        timesteps = torch.randint(0, num_train_timesteps, (n,), generator=generator)
    else:
        timesteps = num_train_timesteps.draw_timesteps(n, generator)
    noise = torch.randn((n, *latent_shape), generator=generator, dtype=torch.float32)
    return UpdateDraws(indices, flips, timesteps, noise)


# -- optimisation ------------------------------------------------------------------------------------------------
def make_optimizer(params: list[torch.nn.Parameter], recipe: LoRARecipe) -> tuple[torch.optim.Optimizer, str]:
    """AdamW with the recipe's settings: the fused implementation on CUDA when this torch supports it, else foreach,
    else the plain loop (each tried in turn). Returns (optimizer, "fused" | "foreach" | "for-loop").

    Not fused on the CPU: torch's fused CPU AdamW measured about 50x slower than foreach on small LoRA tensors."""
    common = dict(lr=recipe.learning_rate, betas=tuple(recipe.betas), eps=recipe.adam_eps,
                  weight_decay=recipe.weight_decay)
    candidates = [("foreach", {"foreach": True}), ("for-loop", {"foreach": False})]
    if params and all(p.device.type == "cuda" for p in params):
        candidates.insert(0, ("fused", {"fused": True}))
    for impl, kwargs in candidates:
        try:
            return torch.optim.AdamW(params, **common, **kwargs), impl
        except (RuntimeError, ValueError, TypeError):
            continue
    return torch.optim.AdamW(params, **common), "default"


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the total gradient norm of ``params`` to ``max_norm`` (no-op when <= 0); returns the norm BEFORE
    clipping (inf / nan when a gradient is not finite)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float())
                                                       for p in grads])))


@dataclass
class UpdateInfo:
    """What one optimizer update did (passed to ``on_update``)."""

    update: int           # 1-based count of updates done
    total: int
    loss: float           # mean loss over the update's samples
    lr: float             # learning rate this update used
    grad_norm: float      # total gradient norm before clipping
    elapsed: float        # seconds since training started
    eta: Optional[float]  # estimated seconds left


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    micro_steps: int = 0
    epochs: int = 0
    optimizer: str = ""
    skipped_updates: int = 0   # fp16 loss scaling: updates skipped because a gradient overflowed
    #: {update count: {layer name: LoraLayer}}: the LoRA as it was after that many updates (``snapshot_steps``)
    snapshots: dict = field(default_factory=dict)

    def history(self) -> list[dict]:
        return [{"step": i + 1, "loss": loss, "lr": lr} for i, (loss, lr) in enumerate(zip(self.losses, self.lrs))]


Predict = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


class LossScalingUnavailableError(RuntimeError):
    """fp16 training asked for dynamic loss scaling, which this torch cannot provide on the training device."""


def train_lora(predict: Predict, latents: torch.Tensor, layers: Mapping[str, LoRALayerParams], recipe: LoRARecipe,
               schedule, generator: torch.Generator, *, cond: object = None,
               device: torch.device | str | None = None, compute_dtype: Optional[torch.dtype] = None,
               loss_scaling: bool = False, on_micro_step: Optional[Callable[[int, int], None]] = None,
               on_update: Optional[Callable[[UpdateInfo], None]] = None,
               snapshot_steps: Iterable[int] = ()) -> TrainResult:
    """Train ``layers`` in place for ``recipe.steps`` optimizer updates; returns the per-update losses, learning
    rates and gradient norms, and a copy of the LoRA after each update count in ``snapshot_steps``
    (``TrainResult.snapshots``; each is bit for bit the LoRA of a separate run of that many updates with the same
    seed and ``schedule_steps`` = this run's schedule length, see :class:`LoRARecipe`).

    ``latents``: the training set in the model's latent space, [N, C, H, W] (any float dtype; kept in fp32).
    ``generator``: the CPU generator every draw comes from (seed it with ``recipe.seed``; layers created with
    :func:`create_lora_layers` from it first). ``compute_dtype``: run ``predict`` under autocast in this dtype
    (None or fp32: no autocast). ``loss_scaling``: dynamic loss scaling (for fp16; LossScalingUnavailableError
    before any work when torch cannot scale on ``device``). ``on_micro_step(update, micro)`` runs before every
    forward pass (check for a cancel there: raising stops training at once); ``on_update(UpdateInfo)`` after every
    optimizer update."""
    recipe.validate()
    if latents.dim() < 2 or latents.shape[0] == 0:
        raise ValueError("the training set is empty")
    snaps = set(parse_snapshot_steps(",".join(str(int(n)) for n in snapshot_steps), recipe.steps))
    device = torch.device(device) if device is not None else latents.device
    scaler = grad_scaler(device, loss_scaling)
    params = lora_parameters(layers)
    if not params:
        raise ValueError("no LoRA layers to train")
    for p in params:
        p.requires_grad_(True)
    optimizer, impl = make_optimizer(params, recipe)
    loop = _Loop(predict, prepare_dataset(latents, recipe.random_flip).to(device), int(latents.shape[0]), recipe,
                 schedule, cond, device, compute_dtype, scaler, on_micro_step)
    order = SampleOrder(loop.n_items, generator)
    result = TrainResult(optimizer=impl)
    start = time.perf_counter()
    for k in range(recipe.steps):
        draws = draw_update(order, generator, recipe.batch_size * recipe.gradient_accumulation,
                            tuple(latents.shape[1:]), recipe, schedule)
        lr = recipe.lr_at(k)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_value, grad_norm = loop.update(k, draws, optimizer, params, result)
        result.losses.append(loss_value)
        result.lrs.append(lr)
        result.grad_norms.append(grad_norm)
        if k + 1 in snaps:
            result.snapshots[k + 1] = {name: layers[name].to_layer() for name in sorted(layers)}
        if on_update is not None:
            elapsed = time.perf_counter() - start
            eta = elapsed / (k + 1) * (recipe.steps - k - 1)
            on_update(UpdateInfo(k + 1, recipe.steps, loss_value, lr, grad_norm, elapsed, eta))
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.requires_grad_(False)
    result.epochs = order.epochs
    return result


@dataclass
class _Loop:
    """One optimizer update of :func:`train_lora`: its micro-batches' forward and backward passes, gradient
    clipping and the (loss-scaled) step."""

    predict: Predict
    data: torch.Tensor
    n_items: int
    recipe: LoRARecipe
    schedule: DiffusionSchedule
    cond: object
    device: torch.device
    compute_dtype: Optional[torch.dtype]
    scaler: object
    on_micro_step: Optional[Callable[[int, int], None]]

    def update(self, k: int, draws: UpdateDraws, optimizer, params, result: TrainResult) -> tuple[float, float]:
        recipe, scaler, device = self.recipe, self.scaler, self.device
        item = (draws.indices + self.n_items * draws.flips.long()) if recipe.random_flip else draws.indices
        bs, acc = int(recipe.batch_size), int(recipe.gradient_accumulation)
        use_autocast = self.compute_dtype is not None and self.compute_dtype != torch.float32
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for m in range(acc):
            if self.on_micro_step is not None:
                self.on_micro_step(k, m)
            sl = slice(m * bs, (m + 1) * bs)
            x0 = self.data[item[sl].to(device)]
            noise, t = draws.noise[sl].to(device), draws.timesteps[sl].to(device)
            with torch.autocast(device_type=device.type, dtype=self.compute_dtype or torch.float32,
                                enabled=use_autocast):
                out = self.predict(self.schedule.add_noise(x0, noise, t), t, self.cond)
            loss = torch.nn.functional.mse_loss(out.float(), self.schedule.target(x0, noise, t).float())
            backward_loss = loss / acc
            (scaler.scale(backward_loss) if scaler is not None else backward_loss).backward()
            loss_sum = loss_sum + loss.detach()
            result.micro_steps += 1
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = clip_gradients(params, recipe.max_grad_norm)
        if scaler is not None:
            scale_before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            result.skipped_updates += int(scaler.get_scale() < scale_before)
        else:
            optimizer.step()
        loss_value = float(loss_sum) / acc
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"the training loss became {loss_value} at update {k + 1}: the model output overflowed in this "
                f"precision; train in fp32 or bf16")
        return loss_value, grad_norm


def grad_scaler(device: torch.device, enabled: bool):
    """torch's dynamic loss scaler for ``device`` (None when not ``enabled``). LossScalingUnavailableError when torch
    cannot make one, or makes a disabled one (torch does that, with only a warning, for CUDA without a GPU):
    fp16 training would otherwise run silently without loss scaling."""
    if not enabled:
        return None
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scaler = torch.amp.GradScaler(device.type)
    except (RuntimeError, ValueError, TypeError, AttributeError) as e:
        raise LossScalingUnavailableError(
            f"fp16 training needs dynamic loss scaling, but torch {torch.__version__} cannot make a GradScaler for "
            f"device {device.type!r} ({e}); train in bf16 or fp32 instead") from e
    if not scaler.is_enabled():
        raise LossScalingUnavailableError(
            f"fp16 training needs dynamic loss scaling, but torch {torch.__version__} disabled its GradScaler for "
            f"device {device.type!r} (is the device available?); train in bf16 or fp32 instead")
    return scaler


@torch.no_grad()
def evaluate_loss(predict: Predict, latents: torch.Tensor, schedule: DiffusionSchedule, *, seed: int = 0,
                  repeats: int = 4, batch_size: int = 8, cond: object = None,
                  device: torch.device | str | None = None) -> float:
    """The recipe's loss on ``latents`` with fixed draws (``repeats`` timesteps and noises per latent from ``seed``,
    timesteps stratified over the schedule): a deterministic figure to compare a model with and without its LoRA."""
    device = torch.device(device) if device is not None else latents.device
    g = torch.Generator().manual_seed(int(seed))
    x = latents.detach().to(torch.float32)
    n = x.shape[0] * repeats
    t_all = schedule.stratified_timesteps(n, g)
    noise_all = torch.randn((n, *x.shape[1:]), generator=g)
    x_all = x.repeat(repeats, *([1] * (x.dim() - 1)))
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x0 = x_all[i:i + batch_size].to(device)
        noise = noise_all[i:i + batch_size].to(device)
        t = t_all[i:i + batch_size].to(device)
        out = predict(schedule.add_noise(x0, noise, t), t, cond)
        err = (out.float() - schedule.target(x0, noise, t).float()).pow(2).mean(dim=tuple(range(1, x0.dim())))
        total += float(err.sum())
        count += x0.shape[0]
    return total / count
