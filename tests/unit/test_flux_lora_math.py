"""Flux LoRA math without ComfyUI: layer counts of Flux dev from its configuration, the name and format
conversions (exact deltas), the flow-matching schedule, the row-block wrapper and out-of-place block forwards."""

from __future__ import annotations

import math

import pytest
import torch

from memora.lora import apply as A
from memora.lora import checkpointing as C
from memora.lora import flow as F
from memora.lora import flux as FX
from memora.lora import formats


def test_flux_dev_layer_and_parameter_counts_follow_from_its_configuration():
    att = FX.lora_size(FX.FLUX_DEV, "attention", 4)
    assert att["layers"] == 19 * 8 + 38 * 3 == 266
    assert att["params"] == 266 * 4 * (3072 + 3072) == 6_537_216
    ff = FX.lora_size(FX.FLUX_DEV, "attention+feedforward", 4)
    # + 4 feed-forward layers per double block (3072 <-> 12288) and proj_mlp / proj_out per single block
    assert ff["layers"] == 266 + 19 * 4 + 38 * 2
    assert ff["params"] == att["params"] + 4 * (19 * 4 * (3072 + 12288) + 38 * ((3072 + 12288) + (3072 + 15360)))


def _layers(seed: int, rank: int = 3, hidden: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (o, i) in FX.block_module_shapes(hidden, 1, 1).items():
        if FX.is_target(m, "attention+feedforward"):
            out[m] = formats.LoraLayer(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), 2.0)
    return out


def test_diffusers_keys_round_trip_with_the_scale_folded_in():
    layers = _layers(0)
    sd = FX.to_diffusers(layers)
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    back = FX.flux_layers(sd)
    assert set(back) == set(layers)
    for m, layer in layers.items():
        assert torch.allclose(back[m].delta(), layer.delta(), atol=1e-6)
    # kohya spellings of diffusers modules (the merge's output, OneTrainer) read back to the same modules
    kohya = formats.to_kohya(sd)
    assert set(FX.flux_layers(kohya)) == set(layers)
    assert FX.kohya_name_to_module("lora_transformer_single_transformer_blocks_0_attn_to_q") == \
        "single_transformer_blocks.0.attn.to_q"
    assert FX.kohya_name_to_module("lora_unet_down_blocks_0_attentions_0_proj_in") is None


def test_sd_scripts_names_carry_exactly_the_same_deltas():
    h, mlp = 8, 32
    layers = _layers(1)
    kohya = FX.to_kohya_bfl(layers, hidden_size=h)
    fused = formats.kohya_layers(kohya)
    qkv = fused["lora_unet_double_blocks_0_img_attn_qkv"].delta()
    assert torch.allclose(qkv, torch.cat([layers[f"transformer_blocks.0.attn.to_{p}"].delta() for p in "qkv"]),
                          atol=1e-6)
    lin1 = fused["lora_unet_single_blocks_0_linear1"].delta()
    assert lin1.shape == (3 * h + mlp, h)
    want = torch.cat([layers[f"single_transformer_blocks.0.attn.to_{p}"].delta() for p in "qkv"]
                     + [layers["single_transformer_blocks.0.proj_mlp"].delta()])
    assert torch.allclose(lin1, want, atol=1e-6)
    assert torch.allclose(fused["lora_unet_single_blocks_0_linear2"].delta(),
                          layers["single_transformer_blocks.0.proj_out"].delta(), atol=1e-6)


def test_sliced_wrapper_adds_each_part_to_its_rows_only():
    layers = _layers(2)
    w = torch.randn(3 * 8 + 32, 8)
    parts = [(0, 8, layers["single_transformer_blocks.0.attn.to_q"]),
             (16, 8, layers["single_transformer_blocks.0.attn.to_v"])]
    counter = A.CallCounter()
    out = A.SlicedLoraWrapper("linear1.weight", parts, counter)(w)
    assert torch.allclose(out[0:8], w[0:8] + parts[0][2].delta(), atol=1e-6)
    assert torch.equal(out[8:16], w[8:16]) and torch.equal(out[24:], w[24:])
    assert torch.allclose(out[16:24], w[16:24] + parts[1][2].delta(), atol=1e-6)
    assert counter.calls == {"linear1.weight": 1}
    with pytest.raises(ValueError, match="overlap"):
        A.SlicedLoraWrapper("x", [(0, 8, parts[0][2]), (4, 8, parts[1][2])], A.CallCounter())


def test_flow_schedule_formulas():
    s = F.FlowSchedule(shift=lambda u: F.flux_time_shift(1.15, u))
    u = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    e = math.exp(1.15)
    assert torch.allclose(s.times(u).double(), e / (e + 1 / u - 1), atol=1e-6)
    assert torch.allclose(F.snr_time_shift(3.0, u), 3 * u / (1 + 2 * u))
    t = F.FlowSchedule().draw_timesteps(50000, torch.Generator().manual_seed(0)).double()
    # logit-normal(0, 1): logit(t) ~ N(0, 1)
    z = torch.log(t / (1 - t))
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    strat = F.FlowSchedule().stratified_timesteps(1000, torch.Generator().manual_seed(1)).double()
    assert abs(float(torch.log(strat / (1 - strat)).std()) - 1) < 0.05
    with pytest.raises(ValueError, match="logit_std"):
        F.FlowSchedule(logit_std=-1.0)


class _InPlaceBlock(torch.nn.Module):
    """Saves its input for the backward pass (LayerNorm), then adds to it in place (as ComfyUI's Flux blocks do)."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(4, elementwise_affine=False)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        x += self.lin(self.norm(x))
        return x


def test_out_of_place_forward_trains_blocks_that_add_in_place():
    torch.manual_seed(0)
    block = _InPlaceBlock()
    x = torch.randn(2, 4)
    with torch.no_grad():
        want = block(x.clone())
    inp = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError):
        block(inp * 1.0).sum().backward()
    with C.out_of_place_forward([block]):
        out = block(inp * 1.0)
        assert type(out) is torch.Tensor
        out.sum().backward()
    assert torch.allclose(out.detach(), want) and block.lin.weight.grad is not None
    assert "forward" not in block.__dict__
