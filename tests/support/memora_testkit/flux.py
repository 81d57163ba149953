"""Tiny Flux-family configurations for ComfyUI's model registry (test-only; tests/support/tiny_flux.py writes the
files).

ComfyUI's detection (comfy.model_detection.detect_unet_config) recognises a Flux state dict by its keys
(double_blocks.*.img_attn.norm.key_norm, img_in) and reads ``guidance_embed`` from the ``guidance_in`` keys; it picks
ComfyUI's own ``Flux`` (dev: model_base.Flux, ModelType.FLUX, ModelSamplingFlux) or ``FluxSchnell`` (ModelType.FLOW,
ModelSamplingDiscreteFlow, shift 1) config. ComfyUI 0.3.64 hard-codes the widths of the real model (hidden 3072,
T5 context 4096), ComfyUI 0.33 reads them from the weights; the subclasses below match only a Flux whose ``txt_in``
is TINY_HIDDEN x TINY_CONTEXT wide (no real model is) and supply those widths and the tiny text encoders (a CLIP-L
and a T5 at width 64, ComfyUI's own FluxTokenizer and encoder classes), everything else is ComfyUI's."""

import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.text_encoders.flux
import comfy.text_encoders.t5
import torch

TINY_HIDDEN = 128  # one head of 128 = sum(axes_dim), Flux's head width
TINY_CONTEXT = 64  # the tiny T5's d_model
TINY_POOLED = 64  # the tiny CLIP-L's width (its pooled output is Flux's `y`)
TINY_FLUX_DIT = dict(hidden_size=TINY_HIDDEN, num_heads=1, axes_dim=[16, 56, 56], context_in_dim=TINY_CONTEXT,
                     vec_in_dim=TINY_POOLED)

TINY_T5_CONFIG = {
    "d_ff": 128, "d_kv": 32, "d_model": TINY_CONTEXT, "decoder_start_token_id": 0, "dropout_rate": 0.0,
    "eos_token_id": 1, "dense_act_fn": "gelu_pytorch_tanh", "initializer_factor": 1.0, "is_encoder_decoder": True,
    "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 2, "num_heads": 2,
    "num_layers": 2, "output_past": True, "pad_token_id": 0, "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False, "vocab_size": 32128,
}


def _tiny_clip_l_config():
    from memora.micro.text import CLIP_CONFIG

    return dict(CLIP_CONFIG, num_hidden_layers=2)


class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
    """ComfyUI's FluxClipModel (T5 hidden states as context, CLIP-L pooled as `y`) with tiny encoders."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        torch.nn.Module.__init__(self)
        self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                                 textmodel_json_config=_tiny_clip_l_config(),
                                                 model_options={**model_options, "model_name": "clip_l"})
        self.t5xxl = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, textmodel_json_config=dict(TINY_T5_CONFIG),
                                                special_tokens={"end": 1, "pad": 0},
                                                model_class=comfy.text_encoders.t5.T5,
                                                model_options={**model_options, "model_name": "t5xxl"})
        self.dtypes = set([dtype])


def _is_tiny(state_dict) -> bool:
    if state_dict is None:
        return False
    for k in state_dict.keys():
        if k.endswith("txt_in.weight") and "double_blocks" not in k:
            return tuple(state_dict[k].shape) == (TINY_HIDDEN, TINY_CONTEXT)
    return False


class TinyFlux(comfy.supported_models.Flux):
    """Flux dev (guidance-distilled: guidance_in present) at tiny width."""

    unet_extra_config = dict(TINY_FLUX_DIT)

    @classmethod
    def matches(cls, unet_config, state_dict=None, **kwargs):  # 0.33 passes unet_key_prefix
        return super().matches(unet_config, state_dict, **kwargs) and _is_tiny(state_dict)

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, TinyFluxClip)


class TinyFluxSchnell(comfy.supported_models.FluxSchnell):
    """Flux schnell (no guidance_in, discrete-flow sampling with shift 1) at tiny width."""

    unet_extra_config = dict(TINY_FLUX_DIT)

    @classmethod
    def matches(cls, unet_config, state_dict=None, **kwargs):  # 0.33 passes unet_key_prefix
        return super().matches(unet_config, state_dict, **kwargs) and _is_tiny(state_dict)

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, TinyFluxClip)


MODELS = (TinyFluxSchnell, TinyFlux)
