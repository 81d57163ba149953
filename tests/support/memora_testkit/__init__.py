"""Test-only ComfyUI custom node module: teaches ComfyUI's model detection one tiny SD1.x configuration.

The tiny UNet (model_channels 32, context_dim 64) matches no real checkpoint, so registering it at the front of
``comfy.supported_models.models`` changes nothing for real models; it lets a generated random checkpoint load through
the stock CheckpointLoaderSimple (UNet + a tiny CLIP text model + a TAESD-structured VAE)."""

import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base

TINY_CLIP_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 64,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 1,
    "projection_dim": 64,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}


class TinyCheckpointClip(comfy.sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, return_projected_pooled=False, dtype=dtype, model_options=model_options,
                         textmodel_json_config=dict(TINY_CLIP_CONFIG))


class TinyClip(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=TinyCheckpointClip, **kwargs)


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
