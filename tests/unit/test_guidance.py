"""memora/guidance.py (AutoMemoRa's arithmetic) on real tensors, no ComfyUI: the guidance combination, which sides
each weight needs, the LoRA switch and its per-layer call counts (docs/merge-and-automemora.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from memora import guidance as G
from memora.lora import apply as A


def _pair(seed: int = 0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_combine_is_bad_plus_w_times_the_difference():
    bad, main = _pair(1)
    for w in (0.5, 2.0, 3.75, -1.0):
        want = bad.double() + w * (main.double() - bad.double())
        got = G.combine(bad, main, w)
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), want, rtol=0, atol=1e-5), w
    # w > 1 pushes past the main side: the distance to bad grows linearly with w
    d1 = (G.combine(bad, main, 1.5) - bad).norm()
    d2 = (G.combine(bad, main, 3.0) - bad).norm()
    assert float(d2 / d1) == pytest.approx(2.0, rel=1e-5)


def test_combine_returns_the_sides_exactly_at_0_and_1():
    bad, main = _pair(2)
    assert G.combine(bad, main, 0) is bad
    assert G.combine(bad, None, 0.0) is bad
    assert G.combine(bad, main, 1) is main
    assert G.combine(None, main, 1.0) is main


def test_combine_names_the_missing_prediction():
    bad, main = _pair(3)
    with pytest.raises(ValueError, match="w = 0 needs the bad prediction"):
        G.combine(None, main, 0.0)
    with pytest.raises(ValueError, match="w = 1 needs the main prediction"):
        G.combine(bad, None, 1.0)
    with pytest.raises(ValueError, match="needs both predictions"):
        G.combine(bad, None, 2.0)


def test_needed_sides_match_what_combine_reads():
    assert G.needed_sides(0.0) == (True, False)
    assert G.needed_sides(1.0) == (False, True)
    assert G.needed_sides(2.0) == (True, True)
    assert G.needed_sides(-0.5) == (True, True)
    bad, main = _pair(4)
    for w in (0.0, 1.0, 2.0):
        need_bad, need_main = G.needed_sides(w)
        G.combine(bad if need_bad else None, main if need_main else None, w)  # must not raise


def test_combining_denoised_predictions_equals_combining_noise_predictions():
    """eps = (x - x0) / sigma is affine in x0 and the weights sum to 1, so guiding x0 (what ComfyUI's guiders return)
    equals guiding eps."""
    x, _ = _pair(5)
    x0_bad, x0_main = _pair(6)
    sigma, w = 3.2, 2.5
    eps_bad, eps_main = (x - x0_bad) / sigma, (x - x0_main) / sigma
    via_eps = x - sigma * G.combine(eps_bad, eps_main, w)
    via_x0 = G.combine(x0_bad, x0_main, w)
    assert torch.allclose(via_eps, via_x0, rtol=0, atol=1e-4)


def test_roles():
    assert G.lora_on_side("lora") == (False, True)  # bad = unlearned, main = unlearned + LoRA
    assert G.lora_on_side("unlearned") == (True, False)  # the roles swap: guidance pushes away from the concept
    with pytest.raises(ValueError, match=r"main must be one of \['lora', 'unlearned'\].*'LoRA'"):
        G.check_role("LoRA")


def _factors(seed, out_f, in_f, rank):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)


def _wrapper(key, down, up, scale, switch, counter=None):
    """AutoMemoRa's per-layer weight function: the pack's one LoRA wrapper, gated by the guider's switch."""
    layer = SimpleNamespace(down=down, up=up, scale=scale)
    counter = counter if counter is not None else A.CallCounter()
    return A.LoraWeightWrapper(key, layer, counter, switch), counter


def test_switched_wrapper_adds_scaled_up_down_only_while_on():
    down, up = _factors(7, 6, 5, 2)
    switch = A.LoraSwitch()
    fn, counter = _wrapper("layer", down, up, 0.75, switch)
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(8))
    keep = weight.clone()
    assert fn(weight) is weight and counter.calls == {"layer": 0}  # off: the weight itself, not counted
    switch.on = True
    out = fn(weight)
    want = weight.double() + 0.75 * (up.double() @ down.double())
    assert torch.allclose(out.double(), want, rtol=0, atol=1e-5)
    assert torch.equal(weight, keep)  # never in place
    assert counter.calls == {"layer": 1}


def test_switched_wrapper_on_a_linear_layer_equals_the_merged_dense_weight():
    lin = torch.nn.Linear(5, 6, bias=False)
    down, up = _factors(9, 6, 5, 3)
    fn, _ = _wrapper("lin", down, up, 0.5, A.LoraSwitch(on=True))
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(10))
    y = torch.nn.functional.linear(x, fn(lin.weight.detach()))
    merged = lin.weight.detach().double() + 0.5 * up.double() @ down.double()
    assert torch.allclose(y.double(), x.double() @ merged.T, rtol=0, atol=1e-5)


def test_switched_wrapper_keeps_dtype_and_conv_shapes():
    down = torch.randn(2, 3, 3, 3)  # a conv LoRA's down: [rank, in, kh, kw]
    up = torch.randn(4, 2, 1, 1)
    fn, _ = _wrapper("conv", down, up, 1.0, A.LoraSwitch(on=True))
    weight = torch.zeros(4, 3, 3, 3, dtype=torch.float16)
    out = fn(weight)
    assert out.dtype == torch.float16 and out.shape == weight.shape
    want = (up.flatten(1) @ down.flatten(1)).reshape(4, 3, 3, 3)
    assert torch.allclose(out.float(), want, rtol=1e-3, atol=1e-2)


def test_switched_wrapper_refuses_mismatched_ranks():
    with pytest.raises(ValueError, match="bad: down has rank 2 but up has rank 3"):
        _wrapper("bad", torch.zeros(2, 5), torch.zeros(6, 3), 1.0, A.LoraSwitch())


def test_run_with_lora_finds_layers_that_did_not_run_and_leaves_the_switch_off():
    switch, counter = A.LoraSwitch(), A.CallCounter()
    a, _ = _wrapper("a", *_factors(11, 3, 3, 1), 1.0, switch, counter)
    _wrapper("b", *_factors(12, 3, 3, 1), 1.0, switch, counter)
    w = torch.eye(3)
    out, before = G.run_with_lora(switch, counter, True, lambda: a(w))
    assert counter.not_run_since(before) == ["b"] and not switch.on
    with pytest.raises(A.LoraNotAppliedError, match="1 of 2 LoRA layers"):
        counter.check(before, "test")
    assert not torch.equal(out, w)
    out, before = G.run_with_lora(switch, counter, False, lambda: a(w))
    assert out is w and before is None and counter.calls["a"] == 1
    with pytest.raises(RuntimeError, match="boom"):
        G.run_with_lora(switch, counter, True, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert not switch.on
