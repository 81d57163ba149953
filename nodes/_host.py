"""The ComfyUI side of the boundary: ModelPatcher -> memora denoiser, schedules read from the model, progress,
interrupts and front-end events. ``memora`` never imports ComfyUI; everything that does lives here."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

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
        f"wrong results, so they are refused.")


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
