"""Test-only ComfyUI custom node module: teaches ComfyUI's model detection one tiny SD1.x configuration.

The tiny UNet (model_channels 32, context_dim 64) matches no real checkpoint, so registering it at the front of
``comfy.supported_models.models`` changes nothing for real models; it lets a generated random checkpoint load through
the stock CheckpointLoaderSimple (UNet + a tiny CLIP text model + a TAESD-structured VAE)."""

import importlib.util
import sys
from pathlib import Path

import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base

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


if not any(m is TinySD15 or getattr(m, "__name__", "") == "TinySD15" for m in comfy.supported_models.models):
    comfy.supported_models.models.insert(0, TinySD15)

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
