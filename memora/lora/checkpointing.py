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


class _OutOfPlace(torch.Tensor):
    """A tensor whose in-place arithmetic runs out of place (``x += y`` rebinds x to ``x + y``): blocks that update
    their input in place after saving it for the backward pass (ComfyUI's Flux blocks: ``x += gate * out`` after
    ``pre_norm(x)``) then train without autograd's "modified by an inplace operation" error. The values are the
    same; only a copy is made where the block would have written into its input."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        func = _OUT_OF_PLACE.get(func, func)
        return super().__torch_function__(func, types, args, kwargs or {})


_OUT_OF_PLACE = {torch.Tensor.__iadd__: torch.Tensor.__add__, torch.Tensor.__isub__: torch.Tensor.__sub__,
                 torch.Tensor.__imul__: torch.Tensor.__mul__, torch.Tensor.__itruediv__: torch.Tensor.__truediv__,
                 torch.Tensor.add_: torch.Tensor.add, torch.Tensor.sub_: torch.Tensor.sub,
                 torch.Tensor.mul_: torch.Tensor.mul, torch.Tensor.addcmul_: torch.Tensor.addcmul}


def _wrap(value, cls):
    if isinstance(value, torch.Tensor):
        return value.as_subclass(cls)
    if isinstance(value, tuple):
        return tuple(_wrap(v, cls) for v in value)
    if isinstance(value, list):
        return [_wrap(v, cls) for v in value]
    return value


@contextlib.contextmanager
def out_of_place_forward(units: list[torch.Tensor]):
    """During the block, each unit's tensor inputs become :class:`_OutOfPlace` and its outputs plain tensors again
    (an instance ``forward`` set and removed in a ``finally``; composes with :func:`checkpointed_forward` entered
    first)."""
    patched = []
    try:
        for m in units:
            previous = m.__dict__.get("forward")
            inner = m.forward

            def forward(*args, _inner=inner, **kwargs):
                out = _inner(*_wrap(args, _OutOfPlace), **{k: _wrap(v, _OutOfPlace) for k, v in kwargs.items()})
                return _wrap(out, torch.Tensor)

            m.forward = forward
            patched.append((m, previous))
        yield
    finally:
        for m, previous in reversed(patched):
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous
