"""nodes/_train_host.patch_other_inference_parameters on real ComfyUI ModelPatchers.

A loader node runs under torch.inference_mode, so every parameter it makes is an inference tensor, which autograd
may not save for the backward pass. Weights and biases of ComfyUI's castable layers reach the training through weight
wrappers (a fresh copy each forward); any other inference parameter (Flux's RMSNorm ``scale`` on ComfyUI 0.3.64, a
top-level parameter of the diffusion model) gets a normal copy as an object patch of the training clone. Shown here:
exactly those get one, equal to the original, without gradient, usable by autograd once ComfyUI patches the clone
in, and the original model (its patcher, its modules, its tensors) is untouched before, during and after."""

from __future__ import annotations

import pytest
import torch

from random_loras import pack_module

DIM = 8
SCALE, OFFSET = "diffusion_model.norm.scale", "diffusion_model.offset"


def _model() -> torch.nn.Module:
    """A diffusion model as a loader leaves it: a castable Linear, an RMSNorm with a plain ``scale`` parameter (as
    Flux's in ComfyUI 0.3.64), a top-level ``offset``, all made under inference mode; ``gain`` made outside it."""
    import comfy.ops
    import comfy.rmsnorm

    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.empty(DIM))

        def forward(self, x):
            return comfy.rmsnorm.rms_norm(x, self.scale)

    class Diffusion(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = comfy.ops.disable_weight_init.Linear(DIM, DIM)
            self.norm = Norm()
            self.offset = torch.nn.Parameter(torch.empty(DIM))

    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        dm = Diffusion()
        for p in dm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) + 1.0)
    dm.gain = torch.nn.Parameter(torch.ones(DIM))
    root = torch.nn.Module()
    root.diffusion_model = dm
    return root


def _norm_then_offset(dm, x) -> torch.Tensor:
    """A forward that makes autograd save both parameters (RMSNorm's weight, the multiplier)."""
    return (dm.norm(x) * dm.offset).square().sum()


def test_inference_parameters_outside_castable_layers_get_a_normal_copy(comfy):
    import comfy.model_patcher

    th = pack_module("nodes._train_host")
    cpu = torch.device("cpu")
    root = _model()
    dm = root.diffusion_model
    patcher = comfy.model_patcher.ModelPatcher(root, load_device=cpu, offload_device=cpu)
    originals = {n: p for n, p in dm.named_parameters()}
    values = {n: p.detach().clone() for n, p in originals.items()}
    assert all(p.is_inference() for n, p in originals.items() if n != "gain") and not originals["gain"].is_inference()
    x = torch.randn(3, DIM, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        _norm_then_offset(dm, x).backward()

    clone = patcher.clone()
    castable = {"diffusion_model.proj": dm.proj}  # what install_wrappers passes: layers with weight functions
    assert th.patch_other_inference_parameters(clone, castable) == 2
    assert set(clone.object_patches) == {SCALE, OFFSET} and not patcher.object_patches
    for key, name in ((SCALE, "norm.scale"), (OFFSET, "offset")):
        copy = clone.object_patches[key]
        assert isinstance(copy, torch.nn.Parameter) and not copy.is_inference() and not copy.requires_grad
        assert torch.equal(copy, values[name]) and copy.data_ptr() != originals[name].data_ptr()
        assert clone.get_model_object(key) is copy and patcher.get_model_object(key) is originals[name]

    clone.patch_model(device_to=cpu)
    try:
        assert dm.norm.scale is clone.object_patches[SCALE] and dm.offset is clone.object_patches[OFFSET]
        assert dm.proj.weight is originals["proj.weight"] and dm.proj.weight.is_inference()  # left to the wrappers
        _norm_then_offset(dm, x).backward()
    finally:
        clone.unpatch_model(device_to=cpu)
    with torch.no_grad():
        xd = x.detach().double()
        norm = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-6) * values["norm.scale"].double()
        want = 2 * norm * values["offset"].double() ** 2 * values["norm.scale"].double()
        want = want * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-6)
        want -= xd * (want * xd).mean(-1, keepdim=True) / (xd.square().mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(x.grad.double(), want, atol=1e-5), float((x.grad.double() - want).abs().max())

    # ComfyUI put the originals back; nothing of the original model changed
    assert all(p is originals[n] for n, p in dm.named_parameters()) and len(originals) == 5
    assert all(torch.equal(p, values[n]) for n, p in dm.named_parameters())
    assert all(p.is_inference() for n, p in dm.named_parameters() if n != "gain")
    assert not patcher.object_patches and not patcher.patches
