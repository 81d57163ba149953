"""Cheap deterministic fingerprints of tensors and weight sets (torch only): what a LoRA file records about the
model and data it was trained on (``memora.base_model_hash``, ``memora.training_latents``)."""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

import torch

def sample_bytes(t: torch.Tensor, n: int = 1024) -> bytes:
    try:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // n)
        return flat[::step][:n].to("cpu", torch.float32).contiguous().numpy().tobytes()
    except Exception:  # a tensor that cannot be read (meta, packed quantised): its shape stands in
        return b""


def patch_tensors(obj: Any, out: list, depth: int = 0) -> None:
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            patch_tensors(o, out, depth + 1)
    elif hasattr(obj, "weights"):
        patch_tensors(getattr(obj, "weights"), out, depth + 1)


def weights_hash(tensors: Iterable[tuple[str, torch.Tensor]], patches: Mapping[str, list]) -> str:
    """"sha256:<hex>" of named tensors (names, shapes, dtypes and a strided sample of at most 1024 values each) and
    of ComfyUI-style weight patches {key: [(strength, patch, strength_model, ...), ...]} (keys, strengths and the
    sampled patch tensors)."""
    h = hashlib.sha256()
    for key, t in tensors:
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(sample_bytes(t))
    for key in sorted(patches):
        for p in patches[key]:
            h.update(f"patch|{key}|{p[0]!r}|{p[2] if len(p) > 2 else ''!r}|".encode())
            found: list = []
            patch_tensors(p[1], found)
            for t in found:
                h.update(f"{tuple(t.shape)}|".encode())
                h.update(sample_bytes(t))
    return "sha256:" + h.hexdigest()


def tensor_hash(t: torch.Tensor) -> str:
    return "sha256:" + hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()
