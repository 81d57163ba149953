"""Test-only ComfyUI custom node module: teaches ComfyUI's model detection tiny SD1.x, SD2.x and SDXL configurations.

The tiny UNet (model_channels 32, context_dim 64) matches no real checkpoint, so registering it at the front of
``comfy.supported_models.models`` changes nothing for real models; it lets a generated random checkpoint load through
the stock CheckpointLoaderSimple (UNet + a tiny CLIP text model + a TAESD-structured VAE)."""

import importlib.util
import sys
from pathlib import Path

import comfy.model_base
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.text_encoders.sd2_clip
import torch

# The tiny CLIP is the micro world's text model (one definition: memora.micro.text.CLIP_CONFIG), wrapped in ComfyUI's
# SD1 CLIP classes by the pack's own nodes/_micro_host.py (loaded here by file: this kit may load before the pack).
_PACK_ROOT = Path(__file__).resolve().parents[3]  # tests/support/memora_testkit -> the pack (symlinks resolved)
if str(_PACK_ROOT) not in sys.path:
    sys.path.append(str(_PACK_ROOT))

from memora.micro.text import CLIP_CONFIG as TINY_CLIP_CONFIG  # noqa: E402


def _micro_host():
    name = "memora_testkit_micro_host"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _PACK_ROOT / "nodes" / "_micro_host.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


TinyClip = _micro_host()._clip_classes(TINY_CLIP_CONFIG)


class TinySD15(comfy.supported_models.SD15):
    unet_config = {
        "context_dim": 64,
        "model_channels": 32,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
    }

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinyClip)


# --- SD2.x and SDXL stand-ins (tests/support/tiny_models.py builds their checkpoints) ---------------------------------
# OpenCLIP-H / -G style text towers at width 64 (GELU, 3 layers so the penultimate layer is not the first, square
# text_projection as ComfyUI's CLIP text model has it). Tokenizers are ComfyUI's own (comfy/sd1_tokenizer).
TINY_CLIP_H_CONFIG = dict(TINY_CLIP_CONFIG, hidden_act="gelu", num_hidden_layers=3, eos_token_id=49407)
TINY_CLIP_G_CONFIG = dict(TINY_CLIP_H_CONFIG)
TINY_CLIP_L_CONFIG = dict(TINY_CLIP_CONFIG, num_hidden_layers=3)  # SDXL reads its penultimate layer


class TinySD2ClipH(comfy.sd1_clip.SDClipModel):
    """comfy.text_encoders.sd2_clip.SD2ClipHModel at tiny width (penultimate layer, pad 0, projected pooled)."""

    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        super().__init__(device=device, layer="hidden", layer_idx=-2, textmodel_json_config=dict(TINY_CLIP_H_CONFIG),
                         dtype=dtype, special_tokens={"start": 49406, "end": 49407, "pad": 0},
                         return_projected_pooled=True, model_options=model_options)


class TinySD2Clip(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        super().__init__(device=device, dtype=dtype, model_options=model_options, clip_name="h",
                         clip_model=TinySD2ClipH, **kwargs)


class TinySDXLClipG(comfy.sd1_clip.SDClipModel):
    """comfy.sdxl_clip.SDXLClipG at tiny width (penultimate layer, no final norm on it, projected pooled output)."""

    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        model_options = {**model_options, "model_name": "clip_g"}
        super().__init__(device=device, layer="hidden", layer_idx=-2, textmodel_json_config=dict(TINY_CLIP_G_CONFIG),
                         dtype=dtype, special_tokens={"start": 49406, "end": 49407, "pad": 0},
                         layer_norm_hidden_state=False, return_projected_pooled=True, model_options=model_options)


class TinySDXLClip(comfy.sdxl_clip.SDXLClipModel):
    """comfy.sdxl_clip.SDXLClipModel with tiny clip_l / clip_g (same encode: [l | g] hidden states, g's pooled)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        torch.nn.Module.__init__(self)
        self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                 layer_norm_hidden_state=False,
                                                 textmodel_json_config=dict(TINY_CLIP_L_CONFIG),
                                                 model_options={**model_options, "model_name": "clip_l"})
        self.clip_g = TinySDXLClipG(device=device, dtype=dtype, model_options=model_options)
        self.dtypes = set([dtype])


class TinySD20(comfy.supported_models.SD20):
    """SD2.x at tiny size. v vs eps is decided from the checkpoint by ComfyUI's own SD2 rule (std of the last output
    block's first norm1.bias > 0.09), applied to the tiny UNet's last output block; a ``ztsnr`` key turns on
    zero-terminal SNR as ComfyUI's SDXL config does for ``v_pred``/``ztsnr`` checkpoints."""

    unet_config = {
        "context_dim": 64,
        "model_channels": 32,
        "use_linear_in_transformer": True,
        "adm_in_channels": None,
        "use_temporal_attention": False,
    }
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16, "attn_precision": torch.float32}

    def model_type(self, state_dict, prefix=""):
        k = "{}output_blocks.3.1.transformer_blocks.0.norm1.bias".format(prefix)
        out = state_dict.get(k, None)
        if self.unet_config["in_channels"] == 4 and out is not None and torch.std(out, unbiased=False) > 0.09:
            if "ztsnr" in state_dict:
                self.sampling_settings["zsnr"] = True
            return comfy.model_base.ModelType.V_PREDICTION
        return comfy.model_base.ModelType.EPS

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd2_clip.SD2Tokenizer, TinySD2Clip)


class TinySDXL(comfy.supported_models.SDXL):
    """SDXL base at tiny size: ComfyUI's SDXL config (model_base.SDXL: 'text_time' adm from pooled_output and the
    size/crop conditioning; v_pred/ztsnr/EDM keys honoured as for SDXL) with tiny widths."""

    unet_config = {
        "model_channels": 32,
        "use_linear_in_transformer": True,
        "transformer_depth": [0, 2],
        "context_dim": 128,
        "adm_in_channels": 64 + 6 * 256,
        "use_temporal_attention": False,
    }
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClip)


from .flux import MODELS as _FLUX_MODELS  # noqa: E402  (tiny Flux dev / schnell: tests/support/tiny_flux.py)

for _tiny in (*_FLUX_MODELS, TinySDXL, TinySD20, TinySD15):
    if not any(m is _tiny or getattr(m, "__name__", "") == _tiny.__name__ for m in comfy.supported_models.models):
        comfy.supported_models.models.insert(0, _tiny)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}


class InterruptAfterCalls:
    """Test-only: a clone of MODEL that asks ComfyUI to interrupt processing after `calls` UNet calls (as the queue's
    cancel button does), so interrupts can be tested through the real executor."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "calls": ("INT", {"default": 3, "min": 1, "max": 10000})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"
    CATEGORY = "testing"

    def wrap(self, model, calls):
        import comfy.model_management

        state = {"n": 0}
        m = model.clone()

        def wrapper(apply_model, args):
            state["n"] += 1
            if state["n"] >= calls:
                comfy.model_management.interrupt_current_processing(True)
            return apply_model(args["input"], args["timestep"], **args["c"])

        m.set_model_unet_function_wrapper(wrapper)
        return (m,)


NODE_CLASS_MAPPINGS["MemoRaTest_InterruptAfterCalls"] = InterruptAfterCalls
