"""The micro world's text encoder: ComfyUI's SD1 CLIP text model structure at width 64, 2 layers.

It is a seeded random CLIP text transformer, kept frozen, like Stable Diffusion's frozen CLIP (but not pretrained):
every prompt still gets its own embedding, and the UNet learns to read them. Prompts are tokenised with the SD1
tokenizer ComfyUI ships (``comfy/sd1_tokenizer``: start token, text, end token, padded to 77 with the end token),
and the embedding is the last layer's hidden states after the final layer norm, exactly what ComfyUI's
CLIPTextEncode gives for an SD1.x model (the ComfyUI tests check this to 1e-5).

Uses ``transformers`` (a ComfyUI dependency); no ComfyUI import.
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


def make_text_model(seed: int):
    """A seeded random CLIPTextModel with CLIP_CONFIG (transformers' own initialisation)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {k: v for k, v in CLIP_CONFIG.items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval()


def load_text_model(state_dict: dict):
    """A CLIPTextModel from a ``text_model.*`` state dict (the shipped clip file without its prefix)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {k: v for k, v in CLIP_CONFIG.items() if k not in ("architectures", "torch_dtype")}
    model = CLIPTextModel(CLIPTextConfig(**cfg))
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


def pretrain(text_model, tok, prompts: Sequence[str], *, steps: int = 300, lr: float = 3e-3, strength: float = 3.0,
             seed: int = 0) -> dict:
    """Give a (random) text encoder distinct embeddings for ``prompts``, in place: the miniature of a *pretrained*
    text encoder, which SD's frozen CLIP is.

    With random weights, prompts that differ in one word ("a photo of a star" / "... circle") get hidden states
    that differ by a few percent: the differing word changes its own position and, through causal attention, only
    slightly the 70-odd end/padding positions after it, so a small UNet learns to read the prompt very slowly. This
    fits the encoder for a few hundred Adam steps so that at every position from the first differing token on, the
    hidden state's deviation from the prompts' mean there is a fixed direction per prompt (random orthogonal unit
    vectors times ``strength``; the final layer norm keeps every state's size). Returns a small log."""
    g = torch.Generator().manual_seed(seed)
    ids = tok(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
              return_tensors="pt").input_ids
    n, width = len(prompts), text_model.config.hidden_size
    # mask[i, p]: prompt i's tokens up to p are unlike every other prompt's (causal attention cannot do better)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i in range(n):
        for p in range(ids.shape[1]):
            mask[i, p] = all(not torch.equal(ids[i, :p + 1], ids[j, :p + 1]) for j in range(n) if j != i)
    first = int(mask.any(0).nonzero()[0]) if mask.any() else 1
    targets = torch.linalg.qr(torch.randn(width, n, generator=g))[0].T * strength  # [n, width] orthogonal
    targets = targets - targets.mean(0, keepdim=True)
    opt = torch.optim.Adam(text_model.parameters(), lr=lr)
    text_model.train()
    losses = []
    for step in range(steps):
        h = text_model(input_ids=ids).last_hidden_state  # [n, 77, width]
        dev = h - h.mean(0, keepdim=True)
        loss = ((dev - targets[:, None, :]).pow(2).mean(-1) * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append([step, round(float(loss.detach()), 5)])
    text_model.eval()
    with torch.no_grad():
        h = text_model(input_ids=ids).last_hidden_state.flatten(1)
        rel = [(float((h[i] - h[0]).norm() / h[0].norm())) for i in range(n)]
    return {"steps": steps, "lr": lr, "strength": strength, "first_differing_position": first, "loss": losses,
            "relative_difference_to_first_prompt": [round(r, 3) for r in rel]}
