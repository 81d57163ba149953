"""Build-only: the micro world's text encoder, made and pretrained (scripts/build_micro_world.py is the only user).

The runtime half (configuration, loading the shipped weights, tokenising, encoding) is ``memora.micro.text``."""

from __future__ import annotations

from typing import Sequence

import torch

from memora.micro.text import MAX_LENGTH, transformers_config


def make_text_model(seed: int):
    """A seeded random CLIPTextModel with CLIP_CONFIG (transformers' own initialisation)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**transformers_config())).eval()


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
