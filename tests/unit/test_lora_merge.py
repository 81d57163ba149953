"""memora.lora.merge without ComfyUI: exactness, truncation energy, weights, order, seeds, formats, errors."""

from __future__ import annotations

import pytest
import torch

from memora.lora import formats, merge
from memora.lora.formats import LoraLayer

# Two linear layers (one shared, one only in some inputs) and a 3x3 conv layer, SD-style kohya names.
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
SHAPES = {Q: (32, 32), K: (32, 24), CONV: (16, 8, 3, 3)}


def make_lora(seed: int, rank: int, alpha: float | None = None, layers=(Q, K, CONV)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in layers:
        shape = SHAPES[name]
        if len(shape) == 4:
            down = torch.randn(rank, *shape[1:], generator=g)
            up = torch.randn(shape[0], rank, 1, 1, generator=g)
        else:
            down = torch.randn(rank, shape[1], generator=g)
            up = torch.randn(shape[0], rank, generator=g)
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    return sd


def deltas(sd) -> dict[str, torch.Tensor]:
    return {n: layer.delta() for n, layer in formats.kohya_layers(sd).items()}


def weighted_sum(sds, weights) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for sd, w in zip(sds, weights):
        for n, d in deltas(sd).items():
            out[n] = out.get(n, torch.zeros_like(d)) + w * d
    return out


def max_err(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max()) for n in a)


A = make_lora(1, rank=4, alpha=2.0)
B = make_lora(2, rank=8, alpha=8.0)
C = make_lora(3, rank=4, alpha=1.0, layers=(Q, CONV))   # no K layer: counts as zero there
W = [0.7, -1.3, 0.4]


def test_concat_reproduces_weighted_sum_exactly():
    res = merge.merge_loras([A, B, C], W, "concat")
    assert max_err(deltas(res.state_dict), weighted_sum([A, B, C], W)) < 1e-6
    layers = formats.kohya_layers(res.state_dict)
    assert layers[Q].rank == 16 and layers[K].rank == 12 and layers[CONV].rank == 16   # ranks 4 + 8 (+ 4)
    assert all(layer.scale == 1.0 for layer in layers.values())
    assert tuple(layers[CONV].down.shape) == (16, 8, 3, 3) and tuple(layers[CONV].up.shape) == (16, 16, 1, 1)
    assert all(r.energy_kept == 1.0 for r in res.layers)


def test_svd_full_rank_equals_linear_sum():
    res = merge.merge_loras([A, B, C], W, "svd", rank=0)
    assert max_err(deltas(res.state_dict), weighted_sum([A, B, C], W)) < 1e-5
    assert all(abs(r.energy_kept - 1.0) < 1e-6 for r in res.layers)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_truncation_energy_matches_a_dense_svd(rank):
    res = merge.merge_loras([A, B, C], W, "svd", rank=rank)
    ref = weighted_sum([A, B, C], W)
    got = deltas(res.state_dict)
    for r in res.layers:
        dense = ref[r.name].flatten(1).double()
        s = torch.linalg.svdvals(dense)
        expected = float((s[:rank] ** 2).sum() / (s ** 2).sum())
        assert r.rank == rank
        assert abs(r.energy_kept - expected) < 1e-6, (r.name, r.energy_kept, expected)
        # the merged layer is the best rank-k approximation: its error energy is exactly what was not kept
        resid = float(((got[r.name].flatten(1).double() - dense) ** 2).sum() / (dense ** 2).sum())
        assert abs(resid - (1 - expected)) < 1e-5
    text = res.report()
    assert "energy kept" in text and Q in text


@pytest.mark.parametrize("method", merge.METHODS)
def test_weight_zero_removes_an_input(method):
    kw = dict(rank=4, density=0.6, seed=5)
    with_zero = merge.merge_loras([A, B, C], [0.7, 0.0, 0.4], method, **kw)
    without = merge.merge_loras([A, C], [0.7, 0.4], method, **kw)
    assert with_zero.state_dict.keys() == without.state_dict.keys()
    for k in without.state_dict:
        assert torch.equal(with_zero.state_dict[k], without.state_dict[k]), k


@pytest.mark.parametrize("method", merge.METHODS)
def test_input_order_does_not_matter(method):
    kw = dict(rank=5, density=0.5, seed=9)
    one = merge.merge_loras([A, B, C], W, method, **kw)
    other = merge.merge_loras([C, A, B], [W[2], W[0], W[1]], method, **kw)
    assert one.state_dict.keys() == other.state_dict.keys()
    for k in one.state_dict:
        assert torch.equal(one.state_dict[k], other.state_dict[k]), k


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_by_seed_and_leaves_global_rng_alone(method):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    one = merge.merge_loras([A, B], [1.0, 1.0], method, rank=0, density=0.3, seed=42)
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG must not be consumed or reseeded"
    same = merge.merge_loras([A, B], [1.0, 1.0], method, rank=0, density=0.3, seed=42)
    other = merge.merge_loras([A, B], [1.0, 1.0], method, rank=0, density=0.3, seed=43)
    for k in one.state_dict:
        assert torch.equal(one.state_dict[k], same.state_dict[k]), k
    assert any(not torch.equal(one.state_dict[k], other.state_dict[k]) for k in one.state_dict if "lora_up" in k)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_peft_methods_are_peft_merge_utils_on_delta_w(method):
    """At a rank covering the whole matrix, the merged delta is exactly peft's function of the dense deltas (DARE
    with torch's CPU generator seeded as documented: one state per layer, from the seed and the layer name)."""
    from peft.utils import merge_utils

    density, seed = 0.4, 7
    res = merge.merge_loras([A, B], [0.8, 1.5], method, rank=64, density=density, seed=seed)
    got = deltas(res.state_dict)
    layers_a, layers_b = formats.kohya_layers(A), formats.kohya_layers(B)
    fn = getattr(merge_utils, method)
    for name in SHAPES:
        task = [layers_a[name].delta().flatten(1), layers_b[name].delta().flatten(1)]
        torch.manual_seed(merge._layer_seed(seed, name))
        ref = fn(task, torch.tensor([0.8, 1.5]), density).reshape(SHAPES[name])
        assert float((got[name] - ref).abs().max()) < 1e-4 * float(ref.abs().max()), name
        # and it really pruned: some entries of the merged delta are exactly zero before re-factorisation
        assert int((ref == 0).sum()) > 0


def test_peft_methods_report_the_refactorisation_energy():
    res = merge.merge_loras([A, B], [1.0, 1.0], "ties", rank=2, density=0.5)
    assert all(r.rank == 2 and 0.0 < r.energy_kept < 1.0 for r in res.layers)
    auto = merge.merge_loras([A, B], [1.0, 1.0], "ties", rank=0, density=0.5)
    assert {r.rank for r in auto.layers} == {12}   # automatic rank: 4 + 8


def test_missing_layer_counts_as_zero():
    res = merge.merge_loras([A, C], [1.0, 2.0], "concat")
    got = deltas(res.state_dict)
    assert torch.allclose(got[K], deltas(A)[K], atol=1e-6)     # C has no K layer
    only_c = merge.merge_loras([C], [2.0], "concat")
    assert K not in formats.kohya_layers(only_c.state_dict)


def test_kohya_and_diffusers_formats_merge_together():
    b_peft = formats.kohya_to_diffusers(B)               # unet.<module>.lora_A/B.weight, alpha folded into B
    assert formats.detect_format(b_peft) == formats.PEFT
    mixed = merge.merge_loras([A, b_peft], [1.0, 0.5], "concat")
    ref = weighted_sum([A, B], [1.0, 0.5])
    assert max_err(deltas(mixed.state_dict), ref) < 1e-6
    old_style = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in b_peft.items()}
    assert formats.detect_format(old_style) == formats.DIFFUSERS_OLD
    mixed_old = merge.merge_loras([A, old_style], [1.0, 0.5], "svd")
    assert max_err(deltas(mixed_old.state_dict), ref) < 1e-5


def test_incompatible_shapes_name_the_layer():
    bad = make_lora(4, rank=4)
    bad[f"{K}.lora_down.weight"] = torch.randn(4, 40)
    with pytest.raises(merge.MergeError, match=K) as info:
        merge.merge_loras([A, bad], [1.0, 1.0], "svd")
    assert "LoRA 1: [32, 24]" in str(info.value) and "LoRA 2: [32, 40]" in str(info.value)


def test_flattened_conv_factors_merge_with_4d_ones():
    flat = dict(B)
    flat[f"{CONV}.lora_down.weight"] = B[f"{CONV}.lora_down.weight"].flatten(1)
    flat[f"{CONV}.lora_up.weight"] = B[f"{CONV}.lora_up.weight"].flatten(1)
    res = merge.merge_loras([A, flat], [1.0, 1.0], "concat")
    layer = formats.kohya_layers(res.state_dict)[CONV]
    assert layer.down.dim() == 4
    assert max_err(deltas(res.state_dict), weighted_sum([A, B], [1.0, 1.0])) < 1e-6


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="mean"), "method must be one of"),
    (dict(method="ties", density=0.0), "density must be in"),
    (dict(method="dare_linear", density=1.5), "density must be in"),
    (dict(method="svd", rank=-1), "rank must be >= 0"),
])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(merge.MergeError, match=message):
        merge.merge_loras([A, B], [1.0, 1.0], **kwargs)


def test_other_bad_inputs_are_refused():
    with pytest.raises(merge.MergeError, match="every weight is 0"):
        merge.merge_loras([A, B], [0.0, 0.0], "concat")
    with pytest.raises(merge.MergeError, match="2 LoRAs but 1 weights"):
        merge.merge_loras([A, B], [1.0], "concat")
    with pytest.raises(merge.MergeError, match="LoRA 2: .*full-weight diff"):
        merge.merge_loras([A, {**B, "lora_unet_x.diff": torch.zeros(3, 3)}], [1.0, 1.0], "concat")
    with pytest.raises(merge.MergeError, match="LoRA 1: unknown LoRA format"):
        merge.merge_loras([{"foo": torch.zeros(1)}], [1.0], "concat")


def test_inputs_are_not_modified():
    a = {k: v.clone() for k, v in A.items()}
    merge.merge_loras([a, B], [2.0, 1.0], "concat")
    merge.merge_loras([a, B], [2.0, 1.0], "dare_ties", density=0.5)
    for k in A:
        assert torch.equal(a[k], A[k])


def test_layer_objects_merge_directly():
    """merge_layers takes normalised {name: LoraLayer} inputs; the same rank-1 layer twice is still rank 1."""
    layer = LoraLayer(down=torch.randn(1, 5), up=torch.randn(6, 1), alpha=4.0)
    res = merge.merge_layers([{Q: layer}, {Q: layer}], [1.0, 1.0], "svd", rank=1)
    assert abs(res.layers[0].energy_kept - 1.0) < 1e-6
    merged = formats.kohya_layers(res.state_dict)[Q]
    assert torch.allclose(merged.delta(), 2 * layer.delta(), atol=1e-5)


def test_large_layers_use_a_reproducible_randomised_svd_with_exact_energy():
    """A 256 x 192 pruned delta truncated to rank 6 goes through torch.svd_lowrank: the energy reported is exactly
    what the returned factors keep, close to the optimum, and the result is the same on every call."""
    name = "lora_unet_big_to_q"
    g = torch.Generator().manual_seed(0)
    ins = [{name: LoraLayer(torch.randn(8, 192, generator=g), torch.randn(256, 8, generator=g), 8.0)}
           for _ in range(2)]
    state = torch.random.get_rng_state()
    res = merge.merge_layers(ins, [1.0, 1.0], "ties", rank=6, density=0.5)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = merge.merge_layers(ins, [1.0, 1.0], "ties", rank=6, density=0.5)
    assert all(torch.equal(res.state_dict[k], again.state_dict[k]) for k in res.state_dict)
    from peft.utils import merge_utils

    dense = merge_utils.ties([i[name].delta() for i in ins], torch.tensor([1.0, 1.0]), 0.5).double()
    got = formats.kohya_layers(res.state_dict)[name].delta().double()
    kept = 1 - float(((dense - got) ** 2).sum() / (dense ** 2).sum())
    optimum = float((torch.linalg.svdvals(dense)[:6] ** 2).sum() / (dense ** 2).sum())
    energy = res.layers[0].energy_kept
    assert abs(energy - kept) < 1e-6, (energy, kept)
    assert optimum * 0.99 <= energy <= optimum + 1e-9, (energy, optimum)
