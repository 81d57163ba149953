"""The micro world's text encoder: ComfyUI's SD1 CLIP text model structure at width 64, 2 layers.

It is a seeded random CLIP text transformer, kept frozen, like Stable Diffusion's frozen CLIP (but not pretrained):
every prompt still gets its own embedding, and the UNet learns to read them. Prompts are tokenised with the SD1
tokenizer ComfyUI ships (``comfy/sd1_tokenizer``: start token, text, end token, padded to 77 with the end token),
and the embedding is the last layer's hidden states after the final layer norm, exactly what ComfyUI's
CLIPTextEncode gives for an SD1.x model (the ComfyUI tests check this to 1e-5).

Uses ``transformers`` (a ComfyUI dependency); no ComfyUI import. The encoder's seeded initialisation and its
pretraining are build-only (``memora_build.micro_text``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

CLIP_CONFIG = {
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
MAX_LENGTH = 77


def transformers_config() -> dict:
    """CLIP_CONFIG as keyword arguments of transformers' CLIPTextConfig (without the file-only keys)."""
    return {k: v for k, v in CLIP_CONFIG.items() if k not in ("architectures", "torch_dtype")}


def load_text_model(state_dict: dict):
    """A CLIPTextModel from a ``text_model.*`` state dict (the shipped clip file without its prefix)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**transformers_config()))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"micro-world CLIP weights do not match the configuration: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()


def tokenizer(sd1_tokenizer_dir: str | Path):
    """transformers' CLIPTokenizer over ComfyUI's ``comfy/sd1_tokenizer`` folder."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(sd1_tokenizer_dir))


@torch.no_grad()
def encode(text_model, tok, prompts: Sequence[str]) -> torch.Tensor:
    """[len(prompts), 77, 64] hidden states (last layer, final layer norm applied)."""
    ids = tok(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
              return_tensors="pt").input_ids
    return text_model(input_ids=ids).last_hidden_state.float()
