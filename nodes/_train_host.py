"""The ComfyUI side of LoRA training: a MODEL as the abstract ``predict(x_t, t, cond)`` of ``memora.lora.train``.

How the input MODEL is left untouched:
- training runs on ``model.clone()``; the LoRA is added to the weights by ``ModelPatcher.add_weight_wrapper`` on the
  clone: ComfyUI's layers call the wrapper at every forward with a fresh copy of the stored weight and use what it
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
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.utils

from memora.lora import recipe as _recipe
from memora.lora import train as _train
from . import _host

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


# -- what the model is -------------------------------------------------------------------------------------------
def prediction_type(model) -> str:
    """"epsilon" or "v_prediction" for discrete-timestep models (SD1.x, SD2.x, SDXL ...); ValueError otherwise."""
    ms = _host.model_sampling(model)
    mro = type(ms).__mro__
    discrete = (isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete)
                and not isinstance(ms, (comfy.model_sampling.ModelSamplingDiscreteEDM,
                                        comfy.model_sampling.StableCascadeSampling)))
    sigma_data = float(getattr(ms, "sigma_data", 1.0))
    if discrete and sigma_data == 1.0:
        if comfy.model_sampling.V_PREDICTION in mro and comfy.model_sampling.EDM not in mro:
            return _train.V_PREDICTION
        if (comfy.model_sampling.EPS in mro and comfy.model_sampling.V_PREDICTION not in mro
                and comfy.model_sampling.X0 not in mro):
            return _train.EPSILON
    kinds = [c.__name__ for c in mro if c.__module__ == comfy.model_sampling.__name__]
    raise ValueError(f"MemoRa LoRA training supports discrete-timestep epsilon- or v-prediction models (SD1.x, SD2.x, "
                     f"SDXL); this model's sampling is {kinds or type(ms).__name__} (flow-matching, EDM and x0 models "
                     f"are not supported)")


def diffusion_schedule(model) -> _train.DiffusionSchedule:
    """alpha_bar per training timestep from the model's own sigma table, and its prediction type."""
    sigmas = _host.model_sampling(model).sigmas.detach().to("cpu", torch.float64)
    return _train.DiffusionSchedule(1.0 / (1.0 + sigmas * sigmas), prediction_type(model))


def compute_dtype(model) -> torch.dtype:
    """The dtype ComfyUI runs this model's UNet in (its manual-cast dtype when it has one)."""
    base = model.model
    if hasattr(base, "get_dtype_inference"):
        return base.get_dtype_inference()
    mc = getattr(base, "manual_cast_dtype", None)
    return mc if mc is not None else base.get_dtype()


def training_dtype(model, precision: str) -> torch.dtype:
    """auto: the dtype ComfyUI already runs the model in (fp32 on the CPU; usually fp16 or bf16 on a GPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return compute_dtype(model)
    return _DTYPES[precision]


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def target_layers(model, targets: str) -> dict[str, tuple[int, ...]]:
    """{'diffusion_model.<ldm path>': weight shape} of the UNet layers that get a LoRA; ValueError when none do."""
    found = _train.find_target_layers(model.model.diffusion_model, targets, prefix="diffusion_model.")
    if not found:
        raise ValueError(f"this model has no layers matching targets {targets!r} (MemoRa LoRA training needs a "
                         f"UNet with attention layers named to_q / to_k / to_v / to_out.0, such as SD1.x)")
    return found


def _castable_layers(diffusion_model) -> dict[str, torch.nn.Module]:
    """Modules that ComfyUI's weight wrappers can reach (comfy.ops layers), by 'diffusion_model.<path>'."""
    return {f"diffusion_model.{n}": m for n, m in diffusion_model.named_modules()
            if hasattr(m, "weight_function") and hasattr(m, "bias_function")}


# -- weight wrappers ---------------------------------------------------------------------------------------------
class LoRAWeightWrapper:
    """ComfyUI weight wrapper adding a trainable LoRA delta: ``W -> W + delta`` in W's dtype; counts its calls."""

    def __init__(self, layer: _train.LoRALayerParams):
        self.layer = layer
        self.calls = 0

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return weight + self.layer.delta().to(device=weight.device, dtype=weight.dtype)


class FreshCopyWrapper:
    """Identity weight wrapper: its presence makes ComfyUI pass a fresh (non-inference) copy of the weight, cast to
    the training precision, so autograd can save it and no stored weight is used directly."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


def install_wrappers(patcher, layers: Mapping[str, _train.LoRALayerParams]) -> dict[str, LoRAWeightWrapper]:
    """LoRA wrappers on the target weights, identity wrappers on every other weight and bias of the UNet."""
    wrappers = {}
    for name, m in _castable_layers(patcher.model.diffusion_model).items():
        if name in layers:
            w = LoRAWeightWrapper(layers[name])
            patcher.add_weight_wrapper(f"{name}.weight", w)
            wrappers[name] = w
        elif isinstance(getattr(m, "weight", None), torch.Tensor):
            patcher.add_weight_wrapper(f"{name}.weight", FreshCopyWrapper())
        if isinstance(getattr(m, "bias", None), torch.Tensor):
            patcher.add_weight_wrapper(f"{name}.bias", FreshCopyWrapper())
    missing = sorted(set(layers) - set(wrappers))
    if missing:
        raise ValueError(f"{len(missing)} target layers are not ComfyUI layers that accept weight wrappers: "
                         f"{missing[:3]}")
    return wrappers


class WrappersNotRunError(RuntimeError):
    """Some LoRA weight wrappers never ran: training would silently skip those layers."""


def check_wrappers_ran(wrappers: Mapping[str, LoRAWeightWrapper]) -> None:
    idle = sorted(n for n, w in wrappers.items() if w.calls == 0)
    if idle:
        raise WrappersNotRunError(
            f"{len(idle)} of {len(wrappers)} LoRA layers were never applied by ComfyUI during the first forward pass "
            f"(their weight wrappers did not run; first: {idle[:3]}). Training them would silently learn nothing. "
            f"This happens with ComfyUI's dynamic VRAM loading (0.33+ on NVIDIA GPUs), which skips weight wrappers "
            f"on small layers: restart ComfyUI with --disable-dynamic-vram to train this model. Nothing was saved "
            f"and the input model is unchanged.")


# -- gradient checkpointing --------------------------------------------------------------------------------------
_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def checkpoint_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's blocks to checkpoint: the outermost modules under its containers that have two or more children
    (ResBlock, SpatialTransformer, ...); single layers are not worth recomputing."""
    out = []
    for child in module.children():
        if isinstance(child, _CONTAINERS):
            out.extend(checkpoint_units(child))
        elif len(list(child.children())) >= 2:
            out.append(child)
    return out


@contextlib.contextmanager
def checkpointed_forward(units: list[torch.nn.Module], enabled: bool):
    """Run the blocks' forward through torch.utils.checkpoint during the block only (instance attribute set and
    removed again; the recomputation in backward calls the original bound forward)."""
    if not enabled or not units:
        yield
        return
    patched = []
    try:
        for m in units:
            if "forward" in m.__dict__:
                continue  # someone else's instance-level forward: leave it alone
            original = m.forward

            def forward(*args, _original=original, **kwargs):
                return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)

            m.forward = forward
            patched.append(m)
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


# -- inputs ------------------------------------------------------------------------------------------------------
def clone_tree(value: Any) -> Any:
    """Copy of a conditioning structure with every tensor cloned (outside inference mode -> trainable-safe); the
    input is not modified; non-tensor objects (control nets, hooks) are shared."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone_tree(v) for v in value]
    if isinstance(value, tuple):
        return tuple(clone_tree(v) for v in value)
    return value


def check_conditioning(positive: Any) -> None:
    if not isinstance(positive, list) or len(positive) == 0:
        raise ValueError("positive: expected a CONDITIONING (a non-empty list of [tensor, dict]), e.g. from "
                         "CLIPTextEncode with the concept prompt")
    for i, c in enumerate(positive):
        if not (isinstance(c, (list, tuple)) and len(c) >= 2 and isinstance(c[1], dict)):
            raise ValueError(f"positive: entry {i} is not a [tensor, dict] pair")
        if isinstance(c[0], torch.Tensor) and not torch.isfinite(c[0]).all():
            raise ValueError(f"positive: entry {i} contains non-finite values (NaN or inf)")
        if isinstance(c[0], torch.Tensor) and c[0].dim() >= 1 and c[0].shape[0] != 1:
            raise ValueError(f"positive: entry {i} holds a batch of {c[0].shape[0]} prompts; MemoRa trains every "
                             f"latent with the one concept prompt: expected a single prompt's conditioning")


def concept_from_prompt(prompt: Any, node_id: Any, input_name: str = "positive") -> str:
    """The concept prompt text when the conditioning comes straight from a text-encode node with a literal text
    (CLIPTextEncode and friends); "" when it cannot be known."""
    try:
        link = prompt[str(node_id)]["inputs"][input_name]
        src = prompt[str(link[0])]
        for key in ("text", "prompt", "text_g", "text_l"):
            v = src["inputs"].get(key)
            if isinstance(v, str):
                return v
    except (KeyError, TypeError, IndexError):
        pass
    return ""


def check_save_target(root: Path, save_name: str) -> Path:
    """Validate save_name against the loras folder and that the folder can be written, creating nothing. Returns
    the path the file would get now (the final name may move on if it is taken meanwhile)."""
    from memora.lora import save as _save

    path = _save.resolve_save_path(root, save_name)
    probe = path.parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise _save.UnwritableFolderError(20, f"cannot save {save_name!r}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise _save.UnwritableFolderError(13, f"cannot save {save_name!r}: folder {probe} is not writable")
    return path


# -- hashes ------------------------------------------------------------------------------------------------------
def _sample_bytes(t: torch.Tensor, n: int = 1024) -> bytes:
    try:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // n)
        return flat[::step][:n].to("cpu", torch.float32).contiguous().numpy().tobytes()
    except Exception:  # a tensor that cannot be read (meta, packed quantised): its shape stands in
        return b""


def _patch_tensors(obj: Any, out: list, depth: int = 0) -> None:
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _patch_tensors(o, out, depth + 1)
    elif hasattr(obj, "weights"):
        _patch_tensors(getattr(obj, "weights"), out, depth + 1)


def base_model_hash(model) -> str:
    """A cheap deterministic fingerprint of the MODEL as given: the stored UNet weights (a strided sample of at most
    1024 values per tensor, with names, shapes and dtypes; weights a loaded clone has patched in place are read from
    its backup) and the model's weight patches (keys, strengths and sampled patch tensors). "sha256:<hex>"."""
    base = model.model
    backups = {}
    for lm in list(comfy.model_management.current_loaded_models):
        p = lm.model
        if p is not None and getattr(p, "model", None) is base:
            for k, v in getattr(p, "backup", {}).items():
                backups[k] = getattr(v, "weight", v)
    h = hashlib.sha256()
    for name, t in sorted(base.diffusion_model.state_dict().items()):
        key = f"diffusion_model.{name}"
        t = backups.get(key, t)
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_sample_bytes(t))
    for key in sorted(getattr(model, "patches", {}) or {}):
        for p in model.patches[key]:
            h.update(f"patch|{key}|{p[0]!r}|{p[2] if len(p) > 2 else ''!r}|".encode())
            tensors: list = []
            _patch_tensors(p[1], tensors)
            for t in tensors:
                h.update(f"{tuple(t.shape)}|".encode())
                h.update(_sample_bytes(t))
    return "sha256:" + h.hexdigest()


def tensor_hash(t: torch.Tensor) -> str:
    return "sha256:" + hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


# -- the training run --------------------------------------------------------------------------------------------
@dataclass
class TrainingRun:
    """Everything one training produced."""

    layers: dict[str, _train.LoRALayerParams]
    result: _train.TrainResult
    wrapped_modules: int
    trainable_parameters: int
    dtype: torch.dtype
    prediction_type: str
    base_model_hash: str
    extra: dict = field(default_factory=dict)


class _TrainingSampler(comfy.samplers.Sampler):
    """A ComfyUI Sampler whose ``sample`` runs the training loop with the guider as the model call."""

    def __init__(self, run: Callable[[Any, dict], Any]):
        self.run = run
        self.output = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar=False):
        self.output = self.run(model_wrap, extra_args)
        return torch.zeros_like(latent_image)


def make_predict(model_wrap, extra_args: dict, schedule: _train.DiffusionSchedule, sigmas: torch.Tensor,
                 on_call: Optional[Callable[[], None]] = None):
    """``predict(x_vp, t, cond)`` for memora's loop: variance-preserving noisy latents at integer timesteps ->
    the model's prediction (epsilon or velocity), computed from ComfyUI's denoised output:
    x_ve = x_vp / sqrt(ab), x0 = model(x_ve, sigma_t), eps = (x_ve - x0) / sigma_t, v = sqrt(ab) eps - sqrt(1-ab) x0."""
    ab_table = schedule.alphas_cumprod

    def predict(x_vp: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        shape = (-1,) + (1,) * (x_vp.dim() - 1)
        ab = ab_table[t.cpu()]
        sqrt_ab = ab.sqrt().to(device=x_vp.device, dtype=torch.float32).view(shape)
        sqrt_1m = (1.0 - ab).sqrt().to(device=x_vp.device, dtype=torch.float32).view(shape)
        sigma = sigmas[t.cpu()].to(device=x_vp.device, dtype=torch.float32)
        x_ve = x_vp / sqrt_ab
        denoised = model_wrap(x_ve, sigma, **extra_args).float()
        if on_call is not None:
            on_call()
        eps = (x_ve - denoised) / sigma.view(shape)
        if schedule.prediction_type == _train.V_PREDICTION:
            return sqrt_ab * eps - sqrt_1m * denoised
        return eps

    return predict


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
    """Drop this module's wrappers (and only them) from every layer's weight/bias functions; returns how many."""
    removed = 0
    ours = (LoRAWeightWrapper, FreshCopyWrapper)
    for m in diffusion_model.modules():
        for attr in ("weight_function", "bias_function"):
            fns = m.__dict__.get(attr)
            if fns and any(isinstance(f, ours) for f in fns):
                kept = [f for f in fns if not isinstance(f, ours)]
                removed += len(fns) - len(kept)
                setattr(m, attr, kept)
    return removed


def train_on_model(model, positive, samples: torch.Tensor, recipe: _recipe.LoRARecipe, precision: str = "auto",
                   gradient_checkpointing: bool = False,
                   on_update: Optional[Callable[[_train.UpdateInfo], None]] = None,
                   on_micro_step: Optional[Callable[[int, int], None]] = None) -> TrainingRun:
    """Train a LoRA on a clone of ``model`` (never modified) with the recipe; ``samples`` are a LATENT's samples."""
    schedule = diffusion_schedule(model)
    shapes = target_layers(model, recipe.targets)
    dtype = training_dtype(model, precision)
    sigmas = _host.model_sampling(model).sigmas.detach().to("cpu", torch.float32)
    base_hash = base_model_hash(model)
    device = model.load_device
    patcher = None
    state: dict = {}
    try:
        with torch.inference_mode(False), torch.enable_grad():
            latents = model.model.process_latent_in(samples.detach().clone().to(torch.float32))
            cond = clone_tree(positive)
            generator = torch.Generator().manual_seed(int(recipe.seed))
            layers = _train.create_lora_layers(shapes, recipe, generator, device=device)
            patcher = model.clone()
            wrappers = install_wrappers(patcher, layers)
            if dtype != compute_dtype(model):
                patcher.add_object_patch("manual_cast_dtype", dtype)
            units = checkpoint_units(patcher.model.diffusion_model) if gradient_checkpointing else []
            shape = list(latents.shape[1:])
            mb = int(recipe.batch_size)
            # training keeps activations for the backward pass: ask ComfyUI for room for a few inference passes
            comfy.model_management.load_models_gpu(
                [patcher], memory_required=patcher.memory_required([mb * 4] + shape))
            first = {"checked": False}

            def after_call():
                if not first["checked"]:
                    first["checked"] = True
                    check_wrappers_ran(wrappers)

            def run(model_wrap, extra_args):
                predict_inner = make_predict(model_wrap, extra_args, schedule, sigmas, after_call)

                def predict(x, t, c):
                    with checkpointed_forward(units, gradient_checkpointing):
                        return predict_inner(x, t, c)

                return _train.train_lora(predict, latents, layers, recipe, schedule, generator, device=device,
                                         loss_scaling=(dtype == torch.float16), on_micro_step=on_micro_step,
                                         on_update=on_update)

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
            state["wrapped"] = len(wrappers)
    finally:
        if patcher is not None:
            unload_patcher(patcher)
        del patcher
        comfy.model_management.soft_empty_cache()
    layers = state["layers"]
    return TrainingRun(layers=layers, result=state["result"], wrapped_modules=state["wrapped"],
                       trainable_parameters=sum(layer.num_params for layer in layers.values()), dtype=dtype,
                       prediction_type=schedule.prediction_type, base_model_hash=base_hash)


def recipe_loss(model, positive, samples: torch.Tensor, seed: int = 0, repeats: int = 4, batch_size: int = 8) -> float:
    """The recipe's loss (epsilon MSE, or velocity for v-prediction models) of ``model`` on a LATENT's samples with
    fixed draws (``memora.lora.train.evaluate_loss``): the same figure for a model with and without a LoRA."""
    schedule = diffusion_schedule(model)
    sigmas = _host.model_sampling(model).sigmas.detach().to("cpu", torch.float32)
    latents = model.model.process_latent_in(samples.detach().clone().to(torch.float32))
    out = {}

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
    out["loss"] = sampler.output
    return float(out["loss"])


# -- progress ----------------------------------------------------------------------------------------------------
class TrainProgress:
    """Per update: the ComfyUI progress bar and a ``memora.train`` event; per micro-step: the interrupt check."""

    def __init__(self, total: int, node_id: Optional[str] = None):
        self.total = int(total)
        self.node_id = node_id if node_id is not None else _host.current_node_id()
        self.bar = comfy.utils.ProgressBar(self.total, node_id=self.node_id)
        self.history: list[dict] = []
        self.start = time.perf_counter()

    def micro_step(self, update: int, micro: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()

    def update(self, info: _train.UpdateInfo) -> None:
        self.history.append({"step": info.update, "loss": info.loss, "lr": info.lr})
        self.bar.update_absolute(info.update, self.total)
        _host.send_event("memora.train", {"node": self.node_id, "step": info.update, "total": info.total,
                                          "loss": info.loss, "lr": info.lr, "elapsed": info.elapsed,
                                          "eta": info.eta})


# -- results -----------------------------------------------------------------------------------------------------
def to_kohya(model, layers: Mapping[str, _train.LoRALayerParams]) -> dict[str, torch.Tensor]:
    """The trained layers as a kohya SD state dict (the pack's LORA_MODEL): diffusers module names where the model
    has a diffusers equivalent (SD UNets), the ldm name otherwise (ComfyUI reads both)."""
    from memora.lora import formats
    from . import _lora_host

    ldm_map = _lora_host.ldm_to_diffusers_map(model)
    named = {}
    for name in sorted(layers):
        ldm = name[len("diffusion_model."):]
        module = ldm_map.get(ldm)
        key = formats.module_to_kohya(module) if module is not None else formats.module_to_kohya(ldm)
        named[key] = layers[name].to_layer()
    return formats.layers_to_kohya(named)
