"""Recovery attacks that need no training of the model: the concept vector (after Ring-A-Bell, text encoder only)
and the sampling probes after "When Are Concepts Erased From Diffusion Models?" (noise injected along DDIM,
inpainting from a partly masked concept image). The method code is in memora/attacks; docs/attack-probes.md.

Every node here publishes the attack cost table the scoreboard reads (title '<display name>: cost'): UNet forward
calls counted as they happen (one batched network call = 1), backward calls (none here), concept images used,
seconds, and the attacker's knowledge tier."""

from __future__ import annotations

import time

import torch
from comfy_api.latest import io

import comfy.sample
import comfy.samplers

from memora.attacks import common as _common
from memora.attacks import concept_vector as cv
from memora.attacks import probes
from . import _host, _schema

SECTION = "attacks"


def counted_model(model):
    """A clone of ``model`` whose UNet calls are counted in a ``CallCounter`` (the original is left as it is);
    returns (clone, counter).

    The count wraps ComfyUI's model function wrapper (every batched call of the diffusion model during sampling),
    chaining any wrapper the model already has."""
    counter = _common.CallCounter()
    clone = model.clone()
    previous = clone.model_options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        counter.forward_calls += 1
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(wrapper)
    return clone, counter


# -- concept vector ----------------------------------------------------------------------------------------------
def _encode(clip, text: str):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond, pooled


def _direction(clip, pairs):
    enc = [(_encode(clip, a), _encode(clip, b)) for a, b in pairs]
    direction = cv.concept_direction([a[0] for a, _ in enc], [b[0] for _, b in enc])
    pooled = None
    if all(isinstance(a[1], torch.Tensor) and isinstance(b[1], torch.Tensor) for a, b in enc):
        pooled = cv.concept_direction([a[1] for a, _ in enc], [b[1] for _, b in enc])
    return direction, pooled


def _shifted_conditioning(clip, prompt: str, direction, pooled_dir, strength: float):
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    out = []
    for cond, extras in conditioning:
        extras = dict(extras)
        if pooled_dir is not None and isinstance(extras.get("pooled_output"), torch.Tensor):
            extras["pooled_output"] = cv.add_direction(extras["pooled_output"].unsqueeze(-2), pooled_dir.unsqueeze(-2),
                                                       strength).squeeze(-2)
        out.append([cv.add_direction(cond, direction, strength), extras])
    return out


def _id_encoder(clip):
    """(encode_ids, vocab) for the genetic search: [P, K] token ids -> [P, T, D] text embeddings, each candidate
    laid out as the tokenizer lays out a prompt (start token, the K ids, end token, padding)."""
    template = clip.tokenize("")

    def layout(ids, chunk):
        start, pad = chunk[0], chunk[-1]
        body = [start] + [(int(i),) + tuple(start[1:]) for i in ids] + [chunk[1]]
        return body + [pad] * (len(chunk) - len(body))

    def encode_ids(batch: torch.Tensor) -> torch.Tensor:
        tokens = {k: [layout(row, v[0]) for row in batch.tolist()] for k, v in template.items()}
        cond = clip.encode_from_tokens(tokens)
        return cond.reshape(batch.shape[0], -1, cond.shape[-1])

    first = next(iter(template.values()))[0]
    return encode_ids, (1, int(first[0][0])), len(first) - 2


def _decode_prompt(clip, ids) -> str:
    tok = clip.tokenizer
    inner = getattr(tok, tok.clip, None) if hasattr(tok, "clip") else None
    inner = inner or next(v for k, v in vars(tok).items() if k.startswith("clip_") and hasattr(v, "tokenizer"))
    return inner.tokenizer.decode(list(ids))


class MemoRaConceptVector(_schema.MemoRaNode):
    """Ring-A-Bell's concept vector (Tsai et al. 2024): the concept's direction in the text encoder's embedding
    space, the mean difference between the embeddings of prompts with and without the concept (paired line by
    line), added with a strength to the embedding of a prompt. Needs the text encoder only: no model call, no image.
    Optionally runs Ring-A-Bell's genetic search for a discrete prompt of search_tokens tokens whose embedding comes
    closest to the shifted one (0 tokens: no search)."""

    DISPLAY = "MemoRa Concept Vector"

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, cls.DISPLAY, SECTION, inputs=[
            io.Clip.Input("clip", tooltip="The text encoder (of the unlearned model: often the original's, unchanged)."),
            io.String.Input("concept_prompts", multiline=True, default="a photo of a star",
                            tooltip="Prompts WITH the concept, one per line."),
            io.String.Input("neutral_prompts", multiline=True, default="a photo of a circle",
                            tooltip="The same prompts WITHOUT the concept, one per line, paired line by line with "
                                    "concept_prompts (same count)."),
            io.String.Input("prompt", multiline=True, default="a photo of a shape",
                            tooltip="The prompt the concept direction is added to."),
            io.Float.Input("strength", default=3.0, min=-100.0, max=100.0, step=0.1, round=0.01,
                           tooltip="Multiple of the concept direction added (Ring-A-Bell's eta: 3 for nudity, "
                                   "5-5.5 for violence)."),
            io.Int.Input("search_tokens", default=0, min=0, max=75,
                         tooltip="Genetic search for a discrete prompt of this many tokens (Ring-A-Bell: 16 for "
                                 "nudity); 0 skips the search."),
            io.Int.Input("search_generations", default=200, min=1, max=10000,
                         tooltip="Generations of the genetic search (Ring-A-Bell: 3000, population 200)."),
            io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Seed of the genetic search."),
        ], outputs=[
            io.Conditioning.Output(display_name="positive",
                                   tooltip="The prompt's conditioning plus strength x the concept direction."),
            io.String.Output(display_name="discrete_prompt",
                             tooltip="The genetic search's prompt (empty when search_tokens is 0)."),
        ])

    @classmethod
    def execute(cls, clip, concept_prompts, neutral_prompts, prompt, strength, search_tokens, search_generations,
                seed) -> io.NodeOutput:
        start = time.perf_counter()
        pairs = cv.paired_prompts(concept_prompts, neutral_prompts)
        if not isinstance(prompt, str) or not prompt.strip():
            raise cv.ConceptVectorInputError("prompt: empty; give the prompt the concept direction is added to")
        direction, pooled_dir = _direction(clip, pairs)
        positive = _shifted_conditioning(clip, prompt, direction, pooled_dir, strength)
        found = ""
        if search_tokens > 0:
            encode_ids, vocab, window = _id_encoder(clip)
            if search_tokens > window:
                raise cv.ConceptVectorInputError(f"search_tokens {search_tokens} does not fit the text encoder's "
                                                 f"window ({window} tokens between start and end)")
            target = cv.add_direction(_encode(clip, prompt)[0], direction, strength)[0]
            progress = _host.StageProgress("genetic search", search_generations)
            ids, _ = cv.genetic_prompt_search(
                encode_ids, target, cv.SearchSettings(tokens=search_tokens, generations=search_generations,
                                                      seed=seed), vocab, lambda g, n, _loss: progress(g, n))
            found = _decode_prompt(clip, ids)
        table = _common.cost_table(cls.DISPLAY, "concept vector", _common.TEXT_ENCODER_ONLY, _common.CallCounter(), 0,
                                   time.perf_counter() - start)
        return io.NodeOutput(positive, found, ui=_host.publish_scores([table]))


# -- sampling probes ---------------------------------------------------------------------------------------------
def _check_sampling(model, positive, negative, steps: int, what: str) -> None:
    _host.check_model_kind(model, what)
    if steps < 1:
        raise ValueError(f"{what}: steps must be >= 1, got {steps}")
    _host.check_conditioning(model, positive, what, "positive")
    _host.check_conditioning(model, negative, what, "negative")


def _probe_sampler(eta: float, inject: tuple, inject_scale: float, seed: int, progress):
    """A ComfyUI KSAMPLER running memora.attacks.probes.noisy_ddim with the sampling model as its denoiser."""
    gen = torch.Generator().manual_seed(int(seed) + 24301)  # apart from the initial noise's generator (seed)

    def noise_fn(shape):
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)

    def sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])

        def eps_fn(xx, sigma):
            return (xx - model(xx, sigma * s_in, **extra_args)) / sigma

        return probes.noisy_ddim(eps_fn, x, sigmas, eta, inject, inject_scale, noise_fn, progress)

    # the stock 'ddim' sampler's inpainting option (fresh noise for the known region), so masked latents match too
    return comfy.samplers.KSAMPLER(sampler_function, inpaint_options={"random": True})


class MemoRaNoiseInjectionProbe(_schema.MemoRaNode):
    """Noise-based probe after Lu et al. 2025 ("When Are Concepts Erased From Diffusion Models?"): DDIM over
    ComfyUI's ddim_uniform schedule with eta > 0 (fresh noise at every step; Lu et al. use eta 1.3-1.9) and/or
    extra Gaussian noise of inject_scale x the current noise level added before the chosen steps. A concept that
    was only steered away from can reappear on the disturbed trajectory. With eta 0 and nothing injected this is
    the stock KSampler with sampler ddim and scheduler ddim_uniform."""

    DISPLAY = "MemoRa Noise-Injection Probe"

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, cls.DISPLAY, SECTION, inputs=[
            io.Model.Input("model", tooltip="The model to probe (the unlearned model)."),
            io.Conditioning.Input("positive", tooltip="The erased concept's prompt."),
            io.Conditioning.Input("negative", tooltip="Negative conditioning for classifier-free guidance."),
            io.Latent.Input("latent_image", tooltip="Where sampling starts, as for KSampler (e.g. Empty Latent Image)."),
            io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM steps (ddim_uniform schedule)."),
            io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                           tooltip="Classifier-free guidance scale."),
            io.Float.Input("eta", default=1.5, min=0.0, max=2.0, step=0.05, round=0.01,
                           tooltip="DDIM eta: 0 deterministic, 1 DDPM's ancestral noise, above 1 more noise than "
                                   "the schedule (Lu et al.: 1.3-1.9)."),
            io.String.Input("inject_steps", default="",
                            tooltip="Steps (0-based, comma-separated, e.g. '5,10') before whose model call extra "
                                    "noise is added; empty for none."),
            io.Float.Input("inject_scale", default=0.0, min=0.0, max=10.0, step=0.05, round=0.01,
                           tooltip="Standard deviation of the injected noise as a multiple of that step's noise "
                                   "level sigma."),
            io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                         tooltip="Seed of the initial noise (as KSampler's) and of the probe's extra noise."),
        ], outputs=[_schema.latent_output("The sampled latents.")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, steps, cfg, eta, inject_steps, inject_scale,
                seed) -> io.NodeOutput:
        start = time.perf_counter()
        _check_sampling(model, positive, negative, steps, cls.DISPLAY)
        inject = probes.parse_inject_steps(inject_steps, steps)
        if inject and inject_scale <= 0:
            raise probes.ProbeInputError(f"inject_steps {list(inject)} given but inject_scale is {inject_scale}: "
                                         f"set inject_scale > 0 or leave inject_steps empty")
        samples = latent_image.get("samples") if isinstance(latent_image, dict) else None
        if not isinstance(samples, torch.Tensor):
            raise ValueError(f"{cls.DISPLAY}: latent_image must be a LATENT with a 'samples' tensor")
        x = comfy.sample.fix_empty_latent_channels(model, samples)
        _host.check_latent(model, x, "latent_image")
        noise = comfy.sample.prepare_noise(x, seed, latent_image.get("batch_index"))
        sigmas = _host.sampling_sigmas(model, steps)
        counted, counter = counted_model(model)
        sampler = _probe_sampler(eta, inject, inject_scale, seed, _host.StageProgress("noise probe", steps))
        out = comfy.sample.sample_custom(counted, noise, cfg, sampler, sigmas, positive, negative, x,
                                         noise_mask=latent_image.get("noise_mask"), disable_pbar=True, seed=seed)
        table = _common.cost_table(cls.DISPLAY, "noise injection", _common.PROMPTS_ONLY, counter, 0,
                                   time.perf_counter() - start)
        return io.NodeOutput({**latent_image, "samples": out}, ui=_host.publish_scores([table]))


def vae_ratio(vae) -> int:
    """The VAE's spatial downscale factor (8 for SD, 4 for the micro world)."""
    r = getattr(vae, "downscale_ratio", 8)
    if isinstance(r, (tuple, list)):
        r = r[-1]
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"this VAE's downscale ratio ({r!r}) is not an image VAE's whole number")
    return r


def check_pixels(pixels, ratio: int, what: str) -> torch.Tensor:
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[-1] < 3:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"{what}: expected an IMAGE batch [batch, height, width, channels >= 3], got {shape}")
    if pixels.shape[0] == 0:
        raise ValueError(f"{what}: the image batch is empty")
    h, w = int(pixels.shape[1]), int(pixels.shape[2])
    if h % ratio or w % ratio:
        raise ValueError(f"{what}: the images are {w} x {h} pixels but this VAE encodes images whose width and height "
                         f"are multiples of {ratio} (nearest: {w // ratio * ratio or ratio} x {h // ratio * ratio or ratio}"
                         f"); resize or crop them first (e.g. ImageScale) rather than letting the VAE crop silently")
    if not torch.isfinite(pixels).all():
        raise ValueError(f"{what}: the images contain non-finite values (NaN or inf)")
    return pixels[..., :3]


class MemoRaInpaintingProbe(_schema.MemoRaNode):
    """Inpainting probe after Lu et al. 2025 ("When Are Concepts Erased From Diffusion Models?"): part of each
    concept image is masked and the model fills it in with ComfyUI's own noise-mask sampling (the path of Set Latent
    Noise Mask + KSampler, sampler ddim, scheduler ddim_uniform). A model that still knows the concept completes it
    from the visible part. The unmasked pixels are returned unchanged; the mask is drawn on the VAE's grid."""

    DISPLAY = "MemoRa Inpainting Probe"

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, cls.DISPLAY, SECTION, inputs=[
            io.Model.Input("model", tooltip="The model to probe (the unlearned model)."),
            io.Vae.Input("vae", tooltip="The VAE of the model's family."),
            io.Conditioning.Input("positive", tooltip="The prompt the model fills in with (e.g. the concept's)."),
            io.Conditioning.Input("negative", tooltip="Negative conditioning for classifier-free guidance."),
            io.Image.Input("pixels", tooltip="The attacker's concept images; width and height multiples of the "
                                             "VAE's factor (8 for SD, 4 for the micro world)."),
            io.Combo.Input("mask_kind", options=list(probes.MASK_KINDS), default="centre",
                           tooltip="Which part is masked: a centred rectangle, the leftmost columns, the top rows, "
                                   "or random boxes."),
            io.Float.Input("mask_fraction", default=0.5, min=0.01, max=0.99, step=0.01, round=0.001,
                           tooltip="Share of the image masked (rounded to the VAE's grid)."),
            io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM steps (ddim_uniform schedule)."),
            io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                           tooltip="Classifier-free guidance scale."),
            io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, round=0.001,
                           tooltip="As KSampler's denoise: 1 redraws the masked part from pure noise."),
            io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                         tooltip="Seed of the sampling noise and of the random boxes."),
        ], outputs=[
            io.Image.Output(display_name="IMAGE", tooltip="The images with the masked part filled in by the model."),
            io.Mask.Output(display_name="MASK", tooltip="The mask (1 = filled in by the model)."),
        ])

    @classmethod
    def execute(cls, model, vae, positive, negative, pixels, mask_kind, mask_fraction, steps, cfg, denoise,
                seed) -> io.NodeOutput:
        start = time.perf_counter()
        _check_sampling(model, positive, negative, steps, cls.DISPLAY)
        ratio = vae_ratio(vae)
        rgb = check_pixels(pixels, ratio, f"{cls.DISPLAY}: pixels")
        b, h, w = int(rgb.shape[0]), int(rgb.shape[1]), int(rgb.shape[2])
        mask = probes.make_mask(mask_kind, mask_fraction, b, h, w, ratio, seed)
        x = comfy.sample.fix_empty_latent_channels(model, vae.encode(rgb))
        _host.check_latent(model, x, "the encoded pixels")
        noise = comfy.sample.prepare_noise(x, seed)
        counted, counter = counted_model(model)
        progress = _host.StageProgress("inpainting probe", steps)
        out = comfy.sample.sample(counted, noise, steps, cfg, "ddim", "ddim_uniform", positive, negative, x,
                                  denoise=denoise, noise_mask=mask.reshape(b, 1, h, w), disable_pbar=True, seed=seed,
                                  callback=lambda i, _x0, _x, total: progress(i + 1, total))
        filled = vae.decode(out)
        if filled.dim() == 5:  # video VAEs decode a frame axis; image VAEs do not
            filled = filled.reshape(-1, *filled.shape[-3:])
        image = probes.composite(rgb.cpu().float(), filled.cpu().float(), mask)
        table = _common.cost_table(cls.DISPLAY, "inpainting", _common.CONCEPT_IMAGES, counter, b,
                                   time.perf_counter() - start)
        return io.NodeOutput(image, mask, ui=_host.publish_scores([table]))


NODES = [MemoRaConceptVector, MemoRaNoiseInjectionProbe, MemoRaInpaintingProbe]
