"""The ComfyUI side of LoRA training: a MODEL as the abstract ``predict(x_t, t, cond)`` of ``memora.lora.train``.

How the input MODEL is left untouched:
- training runs on ``model.clone()``; the LoRA is added to the weights by ``ModelPatcher.add_weight_wrapper`` on the
  clone (the pack's one LoRA wrapper, ``memora.lora.apply.LoraWeightWrapper``, installed by ``_lora_host``): ComfyUI's layers call the wrapper at every forward with a fresh copy of the stored weight and use what it
  returns (``W + alpha / rank * up @ down``), so no stored weight is ever written;
- every other weighted layer of the UNet gets an identity wrapper: it makes ComfyUI hand the layer a fresh copy of
  its weight (in the training precision), because weights loaded under ``torch.inference_mode`` (every loader node)
  are inference tensors that autograd may not save for the backward pass;
- the training precision is an object patch of ``manual_cast_dtype`` on the clone (ComfyUI restores object patches
  when the clone is unloaded);
- gradient checkpointing swaps the ``forward`` of the UNet's blocks only for the duration of each forward call of
  the training clone, and puts it back in a ``finally``;
- the training clone is unloaded at the end, in a ``finally`` (interrupts included): ComfyUI restores the weights it
  patched and drops the wrappers.

The model is called as ComfyUI calls it when sampling: through a ``CFGGuider`` (cfg 1, positive only) and a custom
``Sampler`` whose ``sample`` runs the training loop, so model loading, conditioning preparation (``extra_conds``),
model patches and wrappers all come from ComfyUI, and EPS / v-prediction handling from the model's own
``model_sampling``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

import comfy.model_management
import comfy.samplers

from memora.lora import apply as _apply
from memora.lora import checkpointing as _ckpt
from memora.lora import conditioning as _conditioning
from memora.lora import denoiser as _denoiser
from memora.lora import flow as _flow
from memora.lora import recipe as _recipe
from memora.lora import train as _train
from . import _host, _lora_host
from . import _train_model as _tm


# -- weight wrappers ---------------------------------------------------------------------------------------------
class FreshCopyWrapper:
    """Identity weight wrapper: its presence makes ComfyUI pass a fresh (non-inference) copy of the weight, cast to
    the training precision, so autograd can save it and no stored weight is used directly."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


def install_wrappers(patcher, layers: Mapping[str, _train.LoRALayerParams]) -> _apply.CallCounter:
    """LoRA wrappers on the target weights (their call counter is returned), identity wrappers on every other weight
    and bias of the UNet. Flux: ``layers`` are keyed by diffusers module path; each ComfyUI weight holding some of
    them gets one row-block wrapper (``_lora_host.install_flux_wrappers``)."""
    castable = {f"diffusion_model.{n}": m for n, m in patcher.model.diffusion_model.named_modules()
                if hasattr(m, "weight_function") and hasattr(m, "bias_function")}
    if _lora_host.is_flux(patcher):
        slots = _lora_host.flux_slots(patcher)
        unknown = sorted(set(layers) - set(slots))
        if unknown:
            raise ValueError(f"{len(unknown)} target layers are not Flux layers of this model: {unknown[:3]}")
        counter = _lora_host.install_flux_wrappers(patcher, layers, slots)
        wrapped = {slots[n].key[: -len(".weight")] for n in layers}
    else:
        counter = None
        wrapped = set(layers)
    missing = sorted(wrapped - set(castable))
    if missing:
        raise ValueError(f"{len(missing)} target layers are not ComfyUI layers that accept weight wrappers: "
                         f"{missing[:3]}")
    if counter is None:
        counter = _lora_host.install_lora_wrappers(patcher, {f"{n}.weight": layers[n] for n in layers})
    for name, m in castable.items():
        if name not in wrapped and isinstance(getattr(m, "weight", None), torch.Tensor):
            patcher.add_weight_wrapper(f"{name}.weight", FreshCopyWrapper())
        if isinstance(getattr(m, "bias", None), torch.Tensor):
            patcher.add_weight_wrapper(f"{name}.bias", FreshCopyWrapper())
    patch_other_inference_parameters(patcher, castable)
    return counter


def patch_other_inference_parameters(patcher, castable: Mapping[str, Any]) -> int:
    """Parameters outside ComfyUI's castable layers (e.g. the ``scale`` of Flux's RMSNorm, which its blocks use
    directly) that are inference tensors get a normal copy as an object patch of the training clone (ComfyUI
    restores the original when the clone is unloaded), so autograd may save them; returns how many."""
    n = 0
    with torch.inference_mode(False):
        for name, p in patcher.model.diffusion_model.named_parameters():
            owner = f"diffusion_model.{name.rsplit('.', 1)[0]}" if "." in name else "diffusion_model"
            if owner in castable and name.rsplit(".", 1)[-1] in ("weight", "bias"):
                continue
            if p.is_inference():
                patcher.add_object_patch(f"diffusion_model.{name}",
                                         torch.nn.Parameter(p.detach().clone(), requires_grad=False))
                n += 1
    return n


# -- the training run --------------------------------------------------------------------------------------------
@dataclass
class TrainingRun:
    """Everything one training produced."""

    layers: dict[str, _train.LoRALayerParams]
    result: _train.TrainResult
    trainable_parameters: int
    dtype: torch.dtype
    prediction_type: str
    base_model_hash: str


class _TrainingSampler(comfy.samplers.Sampler):
    """A ComfyUI Sampler whose ``sample`` runs the training loop with the guider as the model call."""

    def __init__(self, run: Callable[[Any, dict], Any]):
        self.run = run
        self.output = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar=False):
        self.output = self.run(model_wrap, extra_args)
        return torch.zeros_like(latent_image)


def unload_patcher(patcher) -> None:
    """Unload the training clone if ComfyUI holds it loaded (weights it patched restored, object patches removed),
    then take the training wrappers off the shared modules: ComfyUI only clears a module's weight functions when the
    next model is loaded, and until then they would keep the LoRA parameters (and their device memory) alive. Runs
    under inference mode, as ComfyUI's own unloading does."""
    mm = comfy.model_management
    with torch.inference_mode():
        for i in reversed(range(len(mm.current_loaded_models))):
            lm = mm.current_loaded_models[i]
            if lm.model is patcher:
                mm.current_loaded_models.pop(i)
                lm.model_unload(unpatch_weights=True)
    remove_training_wrappers(patcher.model.diffusion_model)


def remove_training_wrappers(diffusion_model) -> int:
    """Drop training's wrappers (and only them) from every layer's weight/bias functions; returns how many. Training's
    LoRA wrappers are the ones without a switch: AutoMemoRa's guider, whose clone shares these modules, installs the
    same wrapper class with its switch, and keeps them."""
    removed = 0

    def ours(f) -> bool:
        return isinstance(f, FreshCopyWrapper) or (isinstance(f, _apply.LoraWeightWrapper) and f.switch is None)

    for m in diffusion_model.modules():
        for attr in ("weight_function", "bias_function"):
            fns = m.__dict__.get(attr)
            if fns and any(ours(f) for f in fns):
                kept = [f for f in fns if not ours(f)]
                removed += len(fns) - len(kept)
                setattr(m, attr, kept)
    return removed


@contextlib.contextmanager
def comfy_training_mode():
    """ComfyUI's own training flag (``comfy.model_management.in_training``, 0.33+; what its TrainLoraNode sets) for
    the duration of the block: models then use their differentiable code paths (Flux's rotary embedding in torch
    instead of comfy_kitchen's kernel, which has no backward). Restored in a ``finally``; no-op where ComfyUI has no
    such flag."""
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):
        yield
        return
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


def flux_blocks(patcher) -> list:
    """The blocks of a Flux MODEL (double and single), which add to their input in place after saving it for the
    backward pass: training runs them with ``memora.lora.checkpointing.out_of_place_forward``. [] for other
    models."""
    if not _lora_host.is_flux(patcher):
        return []
    dm = patcher.model.diffusion_model
    return [*getattr(dm, "double_blocks", []), *getattr(dm, "single_blocks", [])]


def make_predict(model_wrap, extra_args: dict, schedule, sigmas: torch.Tensor,
                 on_call: Optional[Callable[[], None]] = None):
    """The training loop's ``predict`` for the model's objective: velocity from a flow model's denoiser
    (``memora.lora.flow``), epsilon / v from a discrete-timestep one (``memora.lora.denoiser``)."""
    if isinstance(schedule, _flow.FlowSchedule):
        return _flow.make_flow_predict(model_wrap, extra_args, on_call)
    return _denoiser.make_predict(model_wrap, extra_args, schedule, sigmas, on_call)


def train_on_model(model, positive, samples: torch.Tensor, recipe: _recipe.LoRARecipe, precision: str = "auto",
                   gradient_checkpointing: bool = False,
                   on_update: Optional[Callable[[_train.UpdateInfo], None]] = None,
                   on_micro_step: Optional[Callable[[int, int], None]] = None,
                   snapshot_steps: tuple[int, ...] = ()) -> TrainingRun:
    """Train a LoRA on a clone of ``model`` (never modified) with the recipe; ``samples`` are a LATENT's samples;
    ``snapshot_steps``: update counts after which a copy of the LoRA is kept (``run.result.snapshots``)."""
    schedule = _tm.diffusion_schedule(model)
    shapes = _tm.target_layers(model, recipe.targets)
    dtype = _tm.training_dtype(model, precision)
    sigmas = _host.model_sampling(model).sigmas.detach().to("cpu", torch.float32)
    base_hash = _tm.base_model_hash(model)
    device = model.load_device
    patcher = None
    state: dict = {}
    try:
        with torch.inference_mode(False), torch.enable_grad(), comfy_training_mode():
            latents = model.model.process_latent_in(samples.detach().clone().to(torch.float32))
            cond = _conditioning.clone_tree(positive)
            generator = torch.Generator().manual_seed(int(recipe.seed))
            layers = _train.create_lora_layers(shapes, recipe, generator, device=device)
            patcher = model.clone()
            counter = install_wrappers(patcher, layers)
            if dtype != _tm.compute_dtype(model):
                patcher.add_object_patch("manual_cast_dtype", dtype)
            units = _ckpt.checkpoint_units(patcher.model.diffusion_model) if gradient_checkpointing else []
            in_place_units = flux_blocks(patcher)
            shape = list(latents.shape[1:])
            mb = int(recipe.batch_size)
            # training keeps activations for the backward pass: ask ComfyUI for room for a few inference passes
            comfy.model_management.load_models_gpu(
                [patcher], memory_required=patcher.memory_required([mb * 4] + shape))
            first = {"checked": False}

            def after_call():  # the first forward pass proves that ComfyUI ran every LoRA wrapper
                if not first["checked"]:
                    first["checked"] = True
                    counter.check(None, "MemoRa LoRA Train (nothing was saved and the input model is unchanged)")

            def run(model_wrap, extra_args):
                predict_inner = make_predict(model_wrap, extra_args, schedule, sigmas, after_call)

                def predict(x, t, c):
                    with _ckpt.checkpointed_forward(units, gradient_checkpointing), \
                            _ckpt.out_of_place_forward(in_place_units):
                        return predict_inner(x, t, c)

                return _train.train_lora(predict, latents, layers, recipe, schedule, generator, device=device,
                                         loss_scaling=(dtype == torch.float16), on_micro_step=on_micro_step,
                                         on_update=on_update, snapshot_steps=snapshot_steps)

            guider = comfy.samplers.CFGGuider(patcher)
            guider.inner_set_conds({"positive": cond})
            guider.set_cfg(1.0)
            sampler = _TrainingSampler(run)
            first_batch = latents[:mb].to(torch.float32)
            guider.sample(torch.zeros_like(first_batch), samples[:mb].detach().clone().to(torch.float32), sampler,
                          sigmas[[-1, 0]].clone(), denoise_mask=None, callback=None, disable_pbar=True,
                          seed=int(recipe.seed))
            state["result"] = sampler.output
            state["layers"] = layers
    finally:
        if patcher is not None:
            unload_patcher(patcher)
        del patcher
        comfy.model_management.soft_empty_cache()
    layers = state["layers"]
    return TrainingRun(layers=layers, result=state["result"],
                       trainable_parameters=sum(layer.num_params for layer in layers.values()), dtype=dtype,
                       prediction_type=schedule.prediction_type, base_model_hash=base_hash)


def recipe_loss(model, positive, samples: torch.Tensor, seed: int = 0, repeats: int = 4, batch_size: int = 8) -> float:
    """The recipe's loss (epsilon MSE, or velocity for v-prediction models) of ``model`` on a LATENT's samples with
    fixed draws (``memora.lora.train.evaluate_loss``): the same figure for a model with and without a LoRA."""
    schedule = _tm.diffusion_schedule(model)
    sigmas = _host.model_sampling(model).sigmas.detach().to("cpu", torch.float32)
    latents = model.model.process_latent_in(samples.detach().clone().to(torch.float32))

    def run(model_wrap, extra_args):
        predict = make_predict(model_wrap, extra_args, schedule, sigmas)
        return _train.evaluate_loss(predict, latents, schedule, seed=seed, repeats=repeats, batch_size=batch_size,
                                    device=model.load_device)

    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": positive})
    guider.set_cfg(1.0)
    sampler = _TrainingSampler(run)
    first = samples[:batch_size].detach().clone().to(torch.float32)
    guider.sample(torch.zeros_like(first), first, sampler, sigmas[[-1, 0]].clone(), disable_pbar=True, seed=seed)
    return float(sampler.output)
