"""Property-based tests of memora.lora.merge with hypothesis.

Properties that hold:
- concat is exact: per layer, the merged delta (alpha/r) up @ down equals sum_i w_i dW_i (fp32 rounding only), for any
  mix of ranks, alphas, factor dtypes (fp16, bf16, fp32), conv/linear layers, layers missing from some inputs, negative
  and zero weights; its rank is the sum of the non-zero-weight inputs' ranks;
- every method (concat, svd, ties, dare_linear, dare_ties, magnitude_prune) gives the same state dict, bit for bit,
  whatever the order of the inputs (the merge sorts them by a hash of their contents first; DARE's masks included);
- concat and full-rank svd are linear: merging merges is the same as merging everything at once (deltas equal).

Where order independence or associativity does NOT hold, and why:
- without the canonical sort the factor layout of concat (which rank block comes first) and DARE's random masks
  (drawn in input order) would depend on the order; the merge sorts, so they do not;
- ties, dare_* and magnitude_prune are not associative: merge(merge(A, B), C) differs from merge(A, B, C), because
  the sign election, the magnitude pruning and the random drop act on the whole set of deltas at once (a worked
  example below); svd truncated below the total rank neither, because truncation does not commute with addition.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memora.lora import formats as F
from memora.lora import merge as M

PROP = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SHAPES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (8, 6),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0": (5, 7),
    "lora_unet_down_blocks_1_resnets_0_conv1": (4, 3, 3, 3),
    "lora_unet_up_blocks_0_resnets_1_conv_shortcut": (4, 6, 1, 1),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (6, 6),
}


@st.composite
def loras(draw):
    """A kohya LoRA state dict over a non-empty subset of SHAPES: random ranks, alphas, dtypes and values."""
    names = draw(st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, max_size=len(SHAPES), unique=True))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        shape = SHAPES[name]
        r = draw(st.integers(1, 3))
        alpha = draw(st.floats(0.25, 8.0))
        if len(shape) == 2:
            down, up = torch.randn(r, shape[1], generator=g), torch.randn(shape[0], r, generator=g)
        else:
            down, up = torch.randn(r, *shape[1:], generator=g), torch.randn(shape[0], r, 1, 1, generator=g)
        sd[f"{name}.lora_down.weight"] = down.to(dtype)
        sd[f"{name}.lora_up.weight"] = up.to(dtype)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


weights_st = st.floats(-2.0, 2.0).filter(lambda w: abs(w) > 1e-3) | st.just(0.0)


def _deltas64(sd) -> dict[str, torch.Tensor]:
    return {n: (layer.up.double().flatten(1) @ layer.down.double().flatten(1)) * layer.scale
            for n, layer in F.kohya_layers(sd).items()}


@PROP
@given(st.lists(st.tuples(loras(), weights_st), min_size=1, max_size=4))
def test_concat_is_the_weighted_sum_of_the_deltas(inputs):
    sds, weights = [x[0] for x in inputs], [x[1] for x in inputs]
    if all(w == 0 for w in weights):
        return
    res = M.merge_loras(sds, weights, "concat")
    merged = _deltas64(res.state_dict)
    expected: dict[str, torch.Tensor] = {}
    size: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for sd, w in zip(sds, weights):
        if w == 0:
            continue
        for name, d in _deltas64(sd).items():
            expected[name] = expected.get(name, 0) + w * d
            size[name] = size.get(name, 0.0) + abs(w) * float(d.abs().max())
            ranks[name] = ranks.get(name, 0) + F.kohya_layers(sd)[name].rank
    assert set(merged) == set(expected)
    for name in expected:
        assert float((merged[name] - expected[name]).abs().max()) <= 1e-5 * (1 + size[name]), name
        assert F.kohya_layers(res.state_dict)[name].rank == ranks[name]
        assert F.kohya_layers(res.state_dict)[name].scale == 1.0
    assert all(r.energy_kept == 1.0 for r in res.layers)


@PROP
@given(st.lists(st.tuples(loras(), weights_st), min_size=2, max_size=3), st.randoms(use_true_random=False),
       st.sampled_from(M.METHODS), st.sampled_from([0, 2]), st.integers(0, 1000))
def test_every_method_ignores_the_order_of_the_inputs(inputs, rnd, method, rank, seed):
    if all(w == 0 for _, w in inputs):
        return
    shuffled = list(inputs)
    rnd.shuffle(shuffled)
    kw = dict(method=method, rank=rank, density=0.5, seed=seed)
    a = M.merge_loras([x[0] for x in inputs], [x[1] for x in inputs], **kw).state_dict
    b = M.merge_loras([x[0] for x in shuffled], [x[1] for x in shuffled], **kw).state_dict
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), (method, k)


@PROP
@given(loras(), loras(), loras(), weights_st, weights_st, weights_st)
def test_concat_and_full_svd_are_associative(x, y, z, wx, wy, wz):
    if 0.0 in (wx, wy, wz):
        return
    for method in ("concat", "svd"):
        flat = _deltas64(M.merge_loras([x, y, z], [wx, wy, wz], method).state_dict)
        inner = M.merge_loras([x, y], [wx, wy], method).state_dict
        nested = _deltas64(M.merge_loras([inner, z], [1.0, wz], method).state_dict)
        assert set(flat) == set(nested)
        for name in flat:
            scale = 1 + float(flat[name].abs().max()) + abs(wx) + abs(wy) + abs(wz)
            assert float((flat[name] - nested[name]).abs().max()) <= 1e-4 * scale, (method, name)


def test_ties_is_not_associative():
    """The worked example: one 1 x 1 layer, deltas +1, +1 and -1.5. Merged at once, the elected sign is + (sum 0.5)
    and the disjoint mean of the agreeing deltas is +1; merging +1 and +1 first gives +1, whose election against
    -1.5 is - (sum -0.5): -1.5."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"

    def one(value):
        return {f"{name}.lora_down.weight": torch.tensor([[1.0]]), f"{name}.lora_up.weight": torch.tensor([[value]]),
                f"{name}.alpha": torch.tensor(1.0)}

    x, y, z = one(1.0), one(1.0), one(-1.5)
    flat = _deltas64(M.merge_loras([x, y, z], [1, 1, 1], "ties", density=1.0).state_dict)[name]
    inner = M.merge_loras([x, y], [1, 1], "ties", density=1.0).state_dict
    nested = _deltas64(M.merge_loras([inner, z], [1, 1], "ties", density=1.0).state_dict)[name]
    assert torch.allclose(flat, torch.tensor([[1.0]], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(nested, torch.tensor([[-1.5]], dtype=torch.float64), atol=1e-6)
