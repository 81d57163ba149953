"""Writing the micro world's safetensors files reproducibly (build-only code: scripts/build_micro_world.py).

safetensors writes a file's ``__metadata__`` entries in a hash map's order, which changes from process to process:
the same tensors and metadata gave different bytes, hence a different sha256 in the manifest, on every build.
:func:`canonical_safetensors` sorts them; :func:`save_safetensors` also keeps an unchanged network's earlier file
byte for byte (a ``--reuse`` build that did not change a network does not change its file or its hash).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from memora.fileio import atomic_write


def canonical_safetensors(blob: bytes) -> bytes:
    """The same file with its header's ``__metadata__`` entries in sorted order: safetensors writes them in a hash
    map's order, which changes from process to process, so the same tensors and metadata gave different bytes (and
    sha256) on every build. Only that object is rewritten, at the same length."""
    n = int.from_bytes(blob[:8], "little")
    header = blob[8:8 + n].decode("utf-8")
    key = '"__metadata__":'
    at = header.find(key)
    if at < 0:
        return blob
    start = at + len(key)
    meta, end = json.JSONDecoder().raw_decode(header, start)
    text = json.dumps(dict(sorted(meta.items())), separators=(",", ":"), ensure_ascii=False)
    if len(text) != end - start:
        raise ValueError("unexpected safetensors metadata layout")
    return blob[:8] + (header[:start] + text + header[end:]).encode("utf-8") + blob[8 + n:]


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None, previous: Path | None = None) -> dict:
    """Write float32 tensors (keys sorted, metadata sorted) atomically; returns the file's record: name, sha256 and
    size. ``previous``: the same file of the --reuse build; when it holds exactly these tensors and metadata it is
    copied byte for byte (an unchanged network keeps its sha256, whatever order an older build wrote)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    tensors = {k: v.detach().contiguous().to(torch.float32).cpu() for k, v in sorted(tensors.items())}
    blob = canonical_safetensors(save(tensors, metadata=metadata))
    if previous is not None and previous.is_file():
        old = load_file(str(previous))
        with safe_open(str(previous), "pt") as f:
            old_meta = f.metadata() or {}
        if (old_meta == (metadata or {}) and old.keys() == tensors.keys()
                and all(torch.equal(old[k], tensors[k]) for k in tensors)):
            blob = previous.read_bytes()
    atomic_write(path, blob, replace=True)
    return {"file": path.name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
            "tensors": len(tensors)}
