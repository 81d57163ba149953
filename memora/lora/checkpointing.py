"""Gradient checkpointing of a network's blocks for the duration of a forward call (torch only).

The training host (nodes/_train_host.py) wraps each forward pass of the training clone in
:func:`checkpointed_forward`: the blocks' ``forward`` is swapped for a checkpointed one only during the call and put
back in a ``finally``, so no module is left modified."""

from __future__ import annotations

import contextlib

import torch

_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def checkpoint_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's blocks to checkpoint: the outermost modules under its containers that have two or more children
    (ResBlock, SpatialTransformer, ...); single layers are not worth recomputing."""
    out = []
    for child in module.children():
        if isinstance(child, _CONTAINERS):
            out.extend(checkpoint_units(child))
        elif len(list(child.children())) >= 2:
            out.append(child)
    return out


@contextlib.contextmanager
def checkpointed_forward(units: list[torch.nn.Module], enabled: bool):
    """Run the blocks' forward through torch.utils.checkpoint during the block only (instance attribute set and
    removed again; the recomputation in backward calls the original bound forward)."""
    if not enabled or not units:
        yield
        return
    patched = []
    try:
        for m in units:
            if "forward" in m.__dict__:
                continue  # someone else's instance-level forward: leave it alone
            original = m.forward

            def forward(*args, _original=original, **kwargs):
                return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)

            m.forward = forward
            patched.append(m)
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
