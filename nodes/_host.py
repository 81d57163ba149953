"""The ComfyUI side of the boundary: ModelPatcher -> memora denoiser, schedules read from the model, progress,
interrupts and front-end events. ``memora`` never imports ComfyUI; everything that does lives here."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths

from memora import contracts
from memora import schedule as _schedule


# -- schedules ---------------------------------------------------------------------------------------------------
def model_sampling(model):
    """The model's sampling object (read through get_model_object: nodes may object-patch it)."""
    return model.get_model_object("model_sampling")


def alphas_cumprod(model) -> torch.Tensor:
    return _schedule.alphas_cumprod_from_sigmas(model_sampling(model).sigmas)


def num_train_timesteps(model) -> int:
    return int(model_sampling(model).sigmas.shape[0])


def sampling_sigmas(model, steps: int, scheduler: str = "ddim_uniform") -> torch.Tensor:
    """The descending sigma ladder a stock KSampler(Advanced) uses for ``steps`` with ``scheduler`` (ends at 0)."""
    return comfy.samplers.calculate_sigmas(model_sampling(model), scheduler, steps).cpu()


# -- model kinds -------------------------------------------------------------------------------------------------
EPSILON = "epsilon"
V_PREDICTION = "v_prediction"
SUPPORTED_SAMPLING = ("discrete-timestep epsilon- or v-prediction models (SD1.x, SD2.x, SDXL: ComfyUI's "
                      "ModelSamplingDiscrete with EPS or V_PREDICTION)")
# What the prediction classes ComfyUI (and its ModelSampling* nodes) combine into a model_sampling object mean.
_KIND_NAMES = {"CONST": "flow matching (Flux, SD3, ...)", "EDM": "EDM", "X0": "x0-prediction",
               "IMG_TO_IMG": "image-to-image x0-prediction", "IMG_TO_IMG_FLOW": "image-to-image flow matching",
               "COSMOS_RFLOW": "rectified flow (Cosmos)", "LCM": "LCM", "V_PREDICTION_DDPM": "v-prediction (DDPM)",
               "ModelSamplingContinuousEDM": "continuous-time EDM schedule",
               "ModelSamplingContinuousV": "continuous-time v schedule",
               "ModelSamplingDiscreteFlow": "discrete flow schedule", "ModelSamplingFlux": "Flux flow schedule",
               "StableCascadeSampling": "Stable Cascade schedule", "ModelSamplingDiscreteEDM": "discrete EDM schedule"}


class UnsupportedModelError(ValueError):
    """A model whose sampling type (prediction and noise schedule) a node does not implement."""


def describe_sampling(model) -> str:
    """The model's sampling type in words: its model_sampling classes (the stock ModelSampling* nodes' wrapper
    class left out) and what they mean, e.g. 'ModelSamplingFlux + CONST: flow matching (Flux, SD3, ...)'."""
    ms = model_sampling(model)
    names = [c.__name__ for c in type(ms).__mro__
             if c not in (object, torch.nn.Module) and c.__name__ != "ModelSamplingAdvanced"]
    meaning = [_KIND_NAMES[n] for n in names if n in _KIND_NAMES]
    return " + ".join(names) + (f": {', '.join(meaning)}" if meaning else "")


def check_model_kind(model, what: str) -> str:
    """EPSILON or V_PREDICTION for the models the pack's DDIM and training math implement: ComfyUI's
    ModelSamplingDiscrete schedule (sigma_data 1, its own sigma/timestep) with EPS or V_PREDICTION's exact
    prediction math (no subclass overriding it: LCM, X0, EDM ... are refused). UnsupportedModelError naming the
    node (``what``), the model's sampling type and what is supported otherwise."""
    import comfy.model_sampling as ms_mod

    ms = model_sampling(model)
    cls = type(ms)
    discrete = (isinstance(ms, ms_mod.ModelSamplingDiscrete)
                and all(getattr(cls, f, None) is getattr(ms_mod.ModelSamplingDiscrete, f, None)
                        for f in ("sigma", "timestep", "percent_to_sigma"))
                and float(getattr(ms, "sigma_data", 1.0)) == 1.0)
    same = ("calculate_input", "noise_scaling", "inverse_noise_scaling")
    eps_math = all(getattr(cls, f, None) is getattr(ms_mod.EPS, f) for f in same)
    if discrete and eps_math:
        if cls.calculate_denoised is ms_mod.EPS.calculate_denoised:
            return EPSILON
        if cls.calculate_denoised is ms_mod.V_PREDICTION.calculate_denoised:
            return V_PREDICTION
    raise UnsupportedModelError(
        f"{what} does not support this model: its sampling type is {describe_sampling(model)}. Supported: "
        f"{SUPPORTED_SAMPLING}. Flow-matching (Flux, SD3), EDM, x0-prediction and LCM models would silently give "
        f"wrong results, so they are refused (flow-matching models: use MemoRa Flow Inversion and MemoRa Flow "
        f"Regenerate).")


def model_family(model) -> str:
    """The model's architecture as ComfyUI's model detection named it: the stock ``comfy.supported_models`` class its
    config is (or derives from), e.g. 'SD15', 'SD20', 'SDXL'; the base-model class name otherwise."""
    cfg = getattr(model.model, "model_config", None)
    for cls in type(cfg).__mro__ if cfg is not None else ():
        if cls.__module__ == "comfy.supported_models":
            return cls.__name__
    return type(model.model).__name__


def _pooled_families():
    import comfy.model_base

    return tuple(getattr(comfy.model_base, n) for n in ("SDXL", "SDXLRefiner") if hasattr(comfy.model_base, n))


REFERENCE_SUPPORTED = "SD1.x-style epsilon-prediction models (the reference implementation runs Stable Diffusion 1.4)"


def check_reference_supported(model, what: str) -> None:
    """The ``reference`` schedule reproduces the reference implementation (gmum/MemoRa), which runs SD1.4 only:
    epsilon prediction, the standard schedule, text-only conditioning. UnsupportedModelError for a v-prediction
    model, a zero-terminal-SNR schedule or a model with extra (adm) conditioning such as SDXL's pooled text and size
    embedding, naming what the model is; checked before anything runs."""
    kind = check_model_kind(model, what)
    family = model_family(model)
    reasons = []
    if kind == V_PREDICTION:
        reasons.append("it is a v-prediction model")
    if bool(getattr(model_sampling(model), "zsnr", False)):
        reasons.append("its noise schedule is zero-terminal-SNR")
    if isinstance(model.model, _pooled_families()) or int(getattr(model.model, "adm_channels", 0) or 0) > 0:
        reasons.append(f"it is a {family} model, conditioned on more than the text embedding (pooled text, size "
                       f"and crop embeddings)")
    if reasons:
        raise UnsupportedModelError(
            f"{what}: schedule 'reference' refuses this model ({family}): {'; '.join(reasons)}. The reference "
            f"implementation never supported that; 'reference' supports only {REFERENCE_SUPPORTED}. Use schedule "
            f"'exact', which works through ComfyUI's model sampling for SD1.x, SD2.x (v-prediction included) and "
            f"SDXL.")


def check_conditioning(model, conditioning: Any, what: str, name: str) -> None:
    """Refuse CONDITIONING this model cannot read, before anything runs: text embeddings of another width than the
    model's cross-attention reads (another model family's text encoder), and, for SDXL-family models, entries
    without the ``pooled_output`` their adm embedding is built from (or of the wrong width)."""
    if not isinstance(conditioning, (list, tuple)):
        return
    family = model_family(model)
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    context_dim = unet_config.get("context_dim")
    pooled_needed = isinstance(model.model, _pooled_families())
    import comfy.model_base

    pooled_width = None
    if isinstance(model.model, comfy.model_base.SDXL) and getattr(model.model, "adm_channels", 0):
        pooled_width = int(model.model.adm_channels) - 6 * 256  # model_base.SDXL: pooled + six 256-wide embeddings
    for i, entry in enumerate(conditioning):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[1], dict):
            continue
        cond, extras = entry[0], entry[1]
        where = f"{what}: {name} (entry {i})"
        if isinstance(cond, torch.Tensor) and context_dim and cond.shape[-1] != int(context_dim):
            raise ValueError(
                f"{where} has {cond.shape[-1]}-wide text embeddings but this {family} model reads "
                f"{int(context_dim)}-wide ones: it was encoded with another model family's text encoder. Encode the "
                f"prompt with the CLIP loaded from this model's checkpoint.")
        if not pooled_needed or "unclip_conditioning" in extras:
            continue
        pooled = extras.get("pooled_output")
        if not isinstance(pooled, torch.Tensor):
            raise ValueError(
                f"{where} has no pooled_output: this {family} model builds its size/crop (adm) conditioning from "
                f"the pooled text embedding, which ComfyUI's CLIPTextEncode / CLIPTextEncodeSDXL put in the "
                f"conditioning. Encode the prompt with those nodes and this model's CLIP (conditioning built or "
                f"edited without it cannot be used).")
        if pooled_width is not None and pooled.shape[-1] != pooled_width:
            raise ValueError(
                f"{where} has a {pooled.shape[-1]}-wide pooled_output but this {family} model needs a "
                f"{pooled_width}-wide one (its adm input is {int(model.model.adm_channels)} = pooled + 6 x 256): it "
                f"was encoded with another model family's text encoder.")


# -- validation --------------------------------------------------------------------------------------------------
def latent_channels(model) -> Optional[int]:
    fmt = getattr(model.model, "latent_format", None)
    return getattr(fmt, "latent_channels", None)


def check_latent(model, samples: Any, what: str = "latent") -> torch.Tensor:
    """Refuse latents the model cannot use, with a message that says what was expected."""
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"{what}: expected a LATENT whose 'samples' is a tensor, got {type(samples).__name__}")
    if samples.dim() != 4:
        raise ValueError(f"{what}: expected image latents of shape [batch, channels, height, width], "
                         f"got shape {tuple(samples.shape)}")
    if samples.shape[0] == 0:
        raise ValueError(f"{what}: the batch is empty (0 latents)")
    ch = latent_channels(model)
    if ch is not None and samples.shape[1] != ch:
        raise ValueError(f"{what}: has {samples.shape[1]} channels but this model works on {ch}-channel latents "
                         f"(was it encoded with another model family's VAE?)")
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples)).sum())
        raise ValueError(f"{what}: contains {bad} non-finite values (NaN or inf); refusing to process it")
    return samples


def check_steps(steps: int, start_at_step: int):
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= start_at_step < steps:
        raise ValueError(f"start_at_step must be in 0..{steps - 1} (it must be smaller than steps={steps}), "
                         f"got {start_at_step}")


# -- progress, interrupts, events --------------------------------------------------------------------------------
def model_folder_roots(folder: str) -> list[Path]:
    """The paths ComfyUI has for a model folder (models/<folder> and extra_model_paths.yaml's); [] for a folder it
    does not know."""
    try:
        return [Path(p) for p in folder_paths.get_folder_paths(folder)]
    except KeyError:
        return []


def send_event(event: str, data: dict):
    """Push an event to connected front ends; silently nothing when there is no server (in-process runs)."""
    try:
        from server import PromptServer
    except Exception:
        return
    inst = getattr(PromptServer, "instance", None)
    if inst is None:
        return
    try:
        inst.send_sync(event, data, getattr(inst, "client_id", None))
    except Exception:
        pass


def current_node_id() -> Optional[str]:
    try:
        from server import PromptServer
        inst = getattr(PromptServer, "instance", None)
        return getattr(inst, "last_node_id", None) if inst is not None else None
    except Exception:
        return None


def publish_scores(tables: list[dict]) -> dict:
    """Send each score table ({title, columns, rows}) as a ``memora.scores`` event and return the matching UI output
    (the node's ``ui=``), which the editor shows on the node."""
    node = current_node_id()
    for t in tables:
        send_event(contracts.EVENT_SCORES, {"node": node, **t})
    return {contracts.UI_SCORES: tables}


class StageProgress:
    """ComfyUI progress bar + interrupt check + a ``memora.progress`` event with an ETA, once per step."""

    def __init__(self, stage: str, total: int, node_id: Optional[str] = None):
        self.stage = stage
        self.total = max(int(total), 1)
        self.node_id = node_id if node_id is not None else current_node_id()
        self.bar = comfy.utils.ProgressBar(self.total)
        self.start = time.perf_counter()

    def __call__(self, step: int, total: Optional[int] = None, *_):
        comfy.model_management.throw_exception_if_processing_interrupted()
        total = total or self.total
        self.bar.update_absolute(step, total)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (total - step) if step > 0 else None
        send_event(contracts.EVENT_PROGRESS, {"node": self.node_id, "stage": self.stage, "step": step, "total": total,
                                       "elapsed": elapsed, "eta": eta})
        comfy.model_management.throw_exception_if_processing_interrupted()


class TrainProgress:
    """LoRA training's progress: per update the ComfyUI progress bar and a ``memora.train`` event (loss, learning
    rate, ETA); per micro-step the interrupt check (the queue's cancel stops training within one step)."""

    def __init__(self, total: int, node_id: Optional[str] = None):
        self.total = int(total)
        self.node_id = node_id if node_id is not None else current_node_id()
        self.bar = comfy.utils.ProgressBar(self.total, node_id=self.node_id)

    def micro_step(self, update: int, micro: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()

    def update(self, info) -> None:
        """``info``: a ``memora.lora.train.UpdateInfo``."""
        self.bar.update_absolute(info.update, self.total)
        send_event(contracts.EVENT_TRAIN, {"node": self.node_id, "step": info.update, "total": info.total,
                                    "loss": info.loss, "lr": info.lr, "elapsed": info.elapsed, "eta": info.eta})


# -- running memora algorithms on a ComfyUI model -----------------------------------------------------------------
EpsAlgorithm = Callable[[Callable[[torch.Tensor, float], torch.Tensor], torch.Tensor], torch.Tensor]


def latents_per_call(base_model, x: torch.Tensor, free_memory: Optional[int] = None) -> int:
    """How many latents of the batch ``x`` one model call may carry, by ComfyUI's own memory estimate.

    ComfyUI's cond batching (``calc_cond_batch``) splits cond from uncond when ``memory_required * 1.5`` exceeds the
    free memory, but never splits the latent batch itself, so a large batch of latents can run out of memory where
    smaller calls would not. This applies the same estimate and margin to the latent batch: the whole batch when
    one conditioning's call for all of it fits, else as many latents as fit (at least 1)."""
    n = int(x.shape[0])
    required = getattr(base_model, "memory_required", None)
    if n <= 1 or required is None:
        return max(n, 1)
    if free_memory is None:
        free_memory = comfy.model_management.get_free_memory(x.device)
    shape = list(x.shape[1:])
    if required([n] + shape) * 1.5 < free_memory:
        return n
    per_item = required([1] + shape) * 1.5
    return max(1, min(n, int(free_memory // per_item) if per_item > 0 else n))


def _even_chunks(n: int, limit: int) -> list[tuple[int, int]]:
    parts = -(-n // max(1, limit))
    size = -(-n // parts)
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class _AlgorithmSampler(comfy.samplers.Sampler):
    """A ComfyUI Sampler that runs a memora algorithm with the guider as its denoiser.

    Running through CFGGuider.sample keeps everything ComfyUI does around sampling: model loading and offloading,
    conditioning preparation, model patches and wrappers, cond/uncond batching chunked by free memory. The latent
    batch goes through the model whole when ComfyUI's memory estimate allows, else in equal chunks that fit
    (``latents_per_call``; decided at the first call). Every latent's prediction is independent of the others', so
    chunking changes no result beyond float rounding."""

    def __init__(self, algorithm: EpsAlgorithm, counter: Optional[list] = None,
                 max_latents_per_call: Optional[int] = None):
        self.algorithm = algorithm
        self.counter = counter
        self.max_latents_per_call = max_latents_per_call
        self.chunk: Optional[int] = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar=False):
        def eps_fn(x: torch.Tensor, sigma: float) -> torch.Tensor:
            s = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=torch.float32)
            if self.chunk is None:
                self.chunk = latents_per_call(getattr(model_wrap, "inner_model", None), x)
                if self.max_latents_per_call:
                    self.chunk = max(1, min(self.chunk, int(self.max_latents_per_call)))
            if self.chunk >= x.shape[0]:
                denoised = model_wrap(x, s, **extra_args)
            else:
                denoised = torch.cat([model_wrap(x[a:b], s[a:b], **extra_args)
                                      for a, b in _even_chunks(x.shape[0], self.chunk)])
            if self.counter is not None:
                self.counter[0] += 1
            return (x - denoised) / float(sigma)

        return self.algorithm(eps_fn, latent_image)


def run_algorithm(model, positive, negative, cfg: float, samples: torch.Tensor, sigmas: torch.Tensor,
                  algorithm: EpsAlgorithm, counter: Optional[list] = None,
                  max_latents_per_call: Optional[int] = None) -> torch.Tensor:
    """Run ``algorithm(eps_fn, x)`` on ``samples`` (a LATENT's unscaled samples); returns unscaled samples.

    The algorithm sees the latent in model space (``latent_format.process_in`` applied) and returns model space.
    ``max_latents_per_call`` caps the latents per model call below what the memory estimate allows."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    samples = samples.detach().clone()
    noise = torch.zeros_like(samples, dtype=torch.float32)
    out = guider.sample(noise, samples, _AlgorithmSampler(algorithm, counter, max_latents_per_call), sigmas,
                        denoise_mask=None, callback=None, disable_pbar=True, seed=0)
    return out.to(device="cpu", dtype=torch.float32)
