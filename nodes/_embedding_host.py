"""The ComfyUI side of the embedding attacks (textual inversion, adversarial prompt): a CLIP whose prompt carries
trainable token vectors, and a frozen MODEL conditioned on them, both differentiable and both left untouched.

- **Token vectors in a prompt.** ComfyUI's own tokenizer places them: the text is tokenized with
  ``embedding:<name>`` where the vectors go, by a copy of the CLIP's tokenizer whose embedding folder is a temporary
  one holding a placeholder file of the right shape; the token list then carries one tensor per vector (what a
  saved embedding file gives a stock CLIP Text Encode), and each is swapped for a row of the trainable tensor.
  ComfyUI's text encoder splices such tensors into the token embeddings, so the conditioning is a differentiable
  function of them and identical to what CLIP Text Encode makes from the saved file.
- **Gradients through frozen weights.** Models loaded by a loader node hold inference tensors, which autograd may
  not save: the text encoder and the UNet run as clones whose every weight gets the pack's identity weight wrapper
  (``_train_host.FreshCopyWrapper``: ComfyUI then hands each layer a fresh copy), as LoRA training does. The
  clones are unloaded and the wrappers removed in a ``finally``; the inputs' weights are never written.
- **In-place residuals.** ComfyUI's CLIP layers add their residuals in place; while the clones are in use, a
  forward pre-hook (removed afterwards) gives each layer norm of the text encoder a copy of its input, so autograd
  can differentiate through them.
- **The live conditioning reaches the UNet** through a model-function wrapper on the UNet clone that replaces the
  cross-attention conditioning of each call; the model is called as the sampler calls it (a ``CFGGuider`` at cfg
  1 and the pack's training sampler), as ``_train_host.train_on_model`` does."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Callable

import torch

import comfy.model_management
import comfy.samplers
import comfy.sd1_clip

from memora.lora import denoiser as _denoiser
from . import _host
from . import _train_host as _th
from . import _train_model as _tm

PLACEHOLDER_NAME = "memora_live_vectors"


# -- the text encoder -------------------------------------------------------------------------------------------
def text_encoder(clip, what: str):
    """(key, SDTokenizer, SDClipModel) of a CLIP with exactly one CLIP-style text encoder (SD1.x: ``l``, SD2.x:
    ``h``); ValueError naming what it has otherwise (SDXL's two encoders and pooled output, T5 models)."""
    if clip is None or not hasattr(clip, "tokenize"):
        raise ValueError(f"{what}: clip is not a CLIP (connect the CLIP output of the checkpoint's loader)")
    keys = sorted(clip.tokenize("").keys())
    tok = getattr(clip.tokenizer, f"clip_{keys[0]}", None) if len(keys) == 1 else None
    enc = getattr(clip.cond_stage_model, f"clip_{keys[0]}", None) if len(keys) == 1 else None
    if not (isinstance(tok, comfy.sd1_clip.SDTokenizer) and isinstance(enc, comfy.sd1_clip.SDClipModel)):
        raise ValueError(f"{what}: supports a CLIP with one CLIP-style text encoder (SD1.x, SD2.x); this CLIP has "
                         f"encoders {keys} ({type(clip.cond_stage_model).__name__}). SDXL (two encoders and a pooled "
                         f"embedding) is not supported yet.")
    return keys[0], tok, enc


def check_model(model, what: str) -> None:
    """Discrete-timestep eps / v models whose text conditioning is cross-attention only (SD1.x, SD2.x)."""
    _host.check_model_kind(model, what)
    if isinstance(model.model, _host._pooled_families()) or int(getattr(model.model, "adm_channels", 0) or 0) > 0:
        raise ValueError(f"{what}: supports models conditioned on the text embedding only (SD1.x, SD2.x); this "
                         f"{_host.model_family(model)} model also reads a pooled text and size embedding, which "
                         f"the attack would have to re-derive at every step (not supported yet)")


def token_table(encoder) -> torch.Tensor:
    """The text encoder's token embedding table as a normal (non-inference) fp32 tensor on the CPU."""
    with torch.inference_mode(False):
        return encoder.transformer.get_input_embeddings().weight.detach().to("cpu", torch.float32).clone()


def word_ids(tokenizer, word: str, what: str, name: str) -> list[int]:
    """The token ids of ``word`` (no start / end tokens); ValueError when it has none."""
    ids = tokenizer.tokenizer(word)["input_ids"]
    ids = ids[tokenizer.tokens_start:-1 if tokenizer.tokenizer_adds_end_token else None]
    if not word.strip() or not ids:
        raise ValueError(f"{what}: {name} {word!r} gives no tokens; expected a word such as 'object'")
    return [int(i) for i in ids]


def check_latent_fits(model, samples, what: str) -> torch.Tensor:
    """The pack's latent checks, and that the UNet can read this size: height and width multiples of its total
    downsampling (2 to the number of its Downsample layers)."""
    samples = _host.check_latent(model, samples, f"{what}: latents")
    downs = sum(1 for m in model.model.diffusion_model.modules() if type(m).__name__ == "Downsample")
    f = 2 ** downs
    h, w = int(samples.shape[-2]), int(samples.shape[-1])
    if h % f or w % f:
        raise ValueError(f"{what}: latents are {h} x {w}, which this UNet cannot read: it halves the resolution "
                         f"{downs} times, so latent height and width must be multiples of {f} (the images were "
                         f"the wrong size for this model; resize them so that their latents are, e.g. "
                         f"{max(f, h - h % f)} x {max(f, w - w % f)})")
    return samples


# -- prompts with live vectors ------------------------------------------------------------------------------------
class LivePrompt:
    """A prompt tokenized by ComfyUI with ``embedding:<placeholder>`` where ``n`` trainable vectors go; ``tokens``
    holds one tensor per vector, ``slots`` their (batch, position)."""

    def __init__(self, clip, key: str, text: str, n: int, width: int, what: str):
        from safetensors.torch import save_file

        tok = copy.copy(clip.tokenizer)
        sub = copy.copy(getattr(tok, f"clip_{key}"))
        setattr(tok, f"clip_{key}", sub)
        with tempfile.TemporaryDirectory(prefix="memora_live_") as d:
            save_file({sub.embedding_key: torch.zeros(n, width)}, str(Path(d) / f"{PLACEHOLDER_NAME}.safetensors"))
            sub.embedding_directory = [d]
            kwargs = {"tokenizer_options": dict(clip.tokenizer_options)} if clip.tokenizer_options else {}
            self.tokens = tok.tokenize_with_weights(text.replace("{}", f"embedding:{PLACEHOLDER_NAME}"), False,
                                                    **kwargs)
        self.key = key
        self.slots = [(b, j) for b, batch in enumerate(self.tokens[key]) for j, entry in enumerate(batch)
                      if torch.is_tensor(entry[0])]
        if len(self.slots) != n:
            raise ValueError(f"{what}: the prompt {text!r} holds {len(self.slots)} of the {n} vectors after "
                             f"tokenizing (is it too long?)")

    def with_vectors(self, vectors: torch.Tensor) -> dict:
        """The token dict with the slots filled by the rows of ``vectors`` (differentiable in them)."""
        out = {k: [list(batch) for batch in v] for k, v in self.tokens.items()}
        for i, (b, j) in enumerate(self.slots):
            out[self.key][b][j] = (vectors[i],) + tuple(out[self.key][b][j][1:])
        return out


def conditioning(clip, tokens: dict):
    """CONDITIONING exactly as CLIP Text Encode makes it from these tokens (no gradient)."""
    with torch.no_grad():
        return clip.encode_from_tokens_scheduled(tokens)


def text_conditioning(clip, text: str):
    return conditioning(clip, clip.tokenize(text))


# -- differentiable clones ----------------------------------------------------------------------------------------
def _fresh_copies(patcher, root: torch.nn.Module, prefix: str) -> None:
    for name, m in root.named_modules():
        if not (hasattr(m, "weight_function") and hasattr(m, "bias_function")):
            continue
        for attr in ("weight", "bias"):
            if isinstance(getattr(m, attr, None), torch.Tensor):
                patcher.add_weight_wrapper(f"{prefix}{name}.{attr}", _th.FreshCopyWrapper())


def _unload(patcher, root: torch.nn.Module) -> None:
    mm = comfy.model_management
    with torch.inference_mode():
        for i in reversed(range(len(mm.current_loaded_models))):
            lm = mm.current_loaded_models[i]
            if lm.model is patcher:
                mm.current_loaded_models.pop(i)
                lm.model_unload(unpatch_weights=True)
    _th.remove_training_wrappers(root)


def _clone_input(module, args):
    """ComfyUI's CLIP layers add their residual in place (``x += attn(layer_norm1(x))``), which autograd refuses
    once the layer norm has saved ``x``: the layer norms get a copy of their input instead."""
    return (args[0].clone(),) + tuple(args[1:])


@contextlib.contextmanager
def differentiable(model, clip):
    """(unet clone, clip clone, holder): the clones compute with fresh copies of their weights; the UNet clone's
    cross-attention conditioning is ``holder["cond"]`` at every call. Both unloaded and unwrapped afterwards."""
    unet = te = None
    hooks: list = []
    holder: dict = {}
    try:
        unet = model.clone()
        _fresh_copies(unet, unet.model.diffusion_model, "diffusion_model.")
        previous = unet.model_options.get("model_function_wrapper")

        def swap_cond(apply_model, args):
            c = dict(args["c"])
            live = holder["cond"]
            c["c_crossattn"] = live.to(args["input"].device).expand(args["input"].shape[0], -1, -1)
            args = {**args, "c": c}
            if previous is not None:
                return previous(apply_model, args)
            return apply_model(args["input"], args["timestep"], **c)

        unet.set_model_unet_function_wrapper(swap_cond)
        te = clip.clone()
        _fresh_copies(te.patcher, te.cond_stage_model, "")
        hooks = [m.register_forward_pre_hook(_clone_input) for m in te.cond_stage_model.modules()
                 if isinstance(m, torch.nn.LayerNorm)]
        yield unet, te, holder
    finally:
        for h in hooks:
            h.remove()
        if te is not None:
            _unload(te.patcher, te.cond_stage_model)
        if unet is not None:
            _unload(unet, unet.model.diffusion_model)
        comfy.model_management.soft_empty_cache()


def encode_live(te, prompt: LivePrompt, vectors: torch.Tensor) -> torch.Tensor:
    """The text embeddings [1, tokens, width] of the prompt with ``vectors`` in its slots, differentiable."""
    return te.encode_from_tokens(prompt.with_vectors(vectors), return_pooled=True, return_dict=True)["cond"]


def run_on_model(unet, holder: dict, first_cond, samples: torch.Tensor, seed: int, batch: int,
                 loop: Callable) -> object:
    """Run ``loop(predict, latents, schedule)`` with ``predict(x_t, t, cond)`` the UNet clone conditioned on
    ``cond`` (a differentiable [1, tokens, width] tensor) and ``latents`` the samples in model space; returns what
    it returns. Runs outside inference mode, with gradients on."""
    schedule = _tm.diffusion_schedule(unet)
    sigmas = _host.model_sampling(unet).sigmas.detach().to("cpu", torch.float32)
    with torch.inference_mode(False), torch.enable_grad():
        latents = unet.model.process_latent_in(samples.detach().clone().to(torch.float32)).to(unet.load_device)
        shape = list(latents.shape[1:])
        comfy.model_management.load_models_gpu([unet], memory_required=unet.memory_required([batch * 4] + shape))

        def run(model_wrap, extra_args):
            inner = _denoiser.make_predict(model_wrap, extra_args, schedule, sigmas)

            def predict(x, t, cond):
                holder["cond"] = cond
                return inner(x, t, cond)

            return loop(predict, latents, schedule)

        guider = comfy.samplers.CFGGuider(unet)
        guider.inner_set_conds({"positive": first_cond})
        guider.set_cfg(1.0)
        sampler = _th._TrainingSampler(run)
        first = samples[:batch].detach().clone().to(torch.float32)
        guider.sample(torch.zeros_like(first), first, sampler, sigmas[[-1, 0]].clone(), denoise_mask=None,
                      callback=None, disable_pbar=True, seed=int(seed))
        return sampler.output
