"""Non-finite values never pass silently (issue 17, item 3), without ComfyUI: the forgetting verdict's thresholds,
LoRA tensors read from a file, and the LoRA merge (every method names the input and the layer)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from memora.evaluation import forgetting
from memora.lora import formats, merge
from memora.lora.formats import LoraLayer

# Recovery 0.7 at 50 steps with SSIM 0.6 there: short-term with the default close_similarity (SSIM 0.5).
CURVE = {"steps": [10, 50, 250], "score": [0.05, 0.7, 0.8], "similarity": [0.2, 0.6, 0.65]}

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _lora(seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inn) in ((Q, (32, 32)), (K, (32, 24))):
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, inn, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    return sd


def _poisoned(seed: int, value: float, key: str = f"{K}.lora_up.weight") -> dict[str, torch.Tensor]:
    sd = _lora(seed)
    sd[key] = sd[key].clone()
    sd[key][3, 1] = value
    return sd


# -- forgetting verdict ----------------------------------------------------------------------------------------------
def test_curve_is_short_term_with_a_finite_close_similarity():
    """The control for the refusals below: the same curve, finite thresholds, a definite verdict."""
    assert forgetting.decide(CURVE).verdict == forgetting.SHORT_TERM
    assert forgetting.decide(CURVE, forgetting.Thresholds(close_similarity=0.7)).verdict == forgetting.LONG_TERM


def test_nan_close_similarity_is_refused_not_turned_into_long_term():
    with pytest.raises(ValueError, match=r"close_similarity must be a finite number, got nan"):
        forgetting.decide(CURVE, forgetting.Thresholds(close_similarity=math.nan))


@pytest.mark.parametrize("field", ["recovered", "partial"])
def test_nan_recovery_thresholds_are_refused(field):
    with pytest.raises(ValueError, match=rf"{field} must be a finite number, got nan"):
        forgetting.decide(CURVE, forgetting.Thresholds(**{field: math.nan}))


@pytest.mark.parametrize("kw", [{"reference_score": math.inf}, {"reference_score": math.nan},
                                {"baseline_score": -math.inf}, {"baseline_score": math.nan}])
def test_non_finite_reference_or_baseline_is_refused(kw):
    """reference_score inf made every recovery 0 ('not recovered'); now it is an error naming the argument."""
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"{name} must be a finite number"):
        forgetting.decide(CURVE, **kw)


# -- LoRA tensors read from a file ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_tensor_in_a_file_is_refused_naming_file_and_first_key(tmp_path, bad):
    path = tmp_path / "poisoned.safetensors"
    sd = _poisoned(1, bad)
    sd[f"{Q}.lora_down.weight"][0, 0] = bad   # two bad tensors: the first (in the file's order) is named
    save_file(sd, str(path))
    read = load_file(str(path))
    first = next(k for k in read if not torch.isfinite(read[k]).all())
    with pytest.raises(formats.NonFiniteTensorError) as e:
        formats.check_finite(read, path.name)
    msg = str(e.value)
    assert msg.startswith(f"poisoned.safetensors: tensor {first!r} holds non-finite values"), msg
    nan = 1 if math.isnan(bad) else 0
    assert f"({nan} NaN, {1 - nan} inf of {read[first].numel()})" in msg, msg
    assert "1 more tensor(s) hold NaN or inf too" in msg, msg


def test_finite_tensors_pass_and_integer_tensors_are_ignored():
    sd = {**_lora(2), "step": torch.tensor(7, dtype=torch.int64)}
    formats.check_finite(sd, "fine.safetensors")   # no exception
    assert formats.first_non_finite(sd) is None


def test_nan_peft_alpha_is_refused():
    """A peft file's alpha comes from its JSON metadata, where NaN is valid JSON: it must not reach the LoRA."""
    sd = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32),
          "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 4)}
    with pytest.raises(formats.NonFiniteTensorError, match="alpha must be a finite number, got nan"):
        formats.to_kohya(sd, fmt=formats.PEFT, alpha=math.nan)


# -- merging -------------------------------------------------------------------------------------------------------
def test_nan_in_a_concat_merge_is_refused_naming_the_input_and_key():
    """concat used to carry the NaN into the merged LoRA without a word."""
    with pytest.raises(merge.MergeError) as e:
        merge.merge_loras([_lora(1), _poisoned(2, math.nan)], [1.0, 1.0], "concat",
                          names=["good.safetensors", "poisoned.safetensors"])
    msg = str(e.value)
    assert msg.startswith(f"poisoned.safetensors: tensor '{K}.lora_up.weight' holds non-finite values"), msg


@pytest.mark.parametrize("method", ["svd", "ties", "dare_linear", "magnitude_prune"])
def test_nan_in_other_merge_methods_is_a_merge_error_naming_input_and_layer(method):
    """svd / peft methods used to fail inside torch.linalg with an error naming neither the file nor the layer."""
    with pytest.raises(merge.MergeError) as e:
        merge.merge_loras([_lora(1), _poisoned(2, math.inf)], [1.0, 0.5], method, density=0.5)
    msg = str(e.value)
    assert msg.startswith("LoRA 2: tensor") and f"'{K}.lora_up.weight'" in msg, msg


@pytest.mark.parametrize("method", merge.METHODS)
def test_merge_layers_refuses_non_finite_layers_naming_input_and_layer(method):
    """Normalised inputs given directly (the node's path): the layer check names the input and the layer."""
    good = formats.kohya_layers(_lora(1))
    bad = formats.kohya_layers(_poisoned(2, math.nan))
    with pytest.raises(merge.MergeError, match=rf"LoRA [12]: layer '{K}' lora_up holds NaN or inf \(1 NaN of"):
        merge.merge_layers([good, bad], [1.0, 1.0], method, density=0.5)


def test_merge_that_overflows_is_refused_naming_the_layer():
    """Finite inputs whose weighted delta overflows float32: the merged layer would hold inf."""
    huge = _lora(3)
    huge[f"{Q}.lora_up.weight"] = huge[f"{Q}.lora_up.weight"] * 1e38
    with pytest.raises(merge.MergeError, match=rf"layer '{Q}': the concat merge produced NaN or inf in lora_up"):
        merge.merge_loras([huge], [10.0], "concat")


def test_merge_of_finite_loras_still_works_with_names():
    res = merge.merge_loras([_lora(1), _lora(2)], [1.0, -0.5], "concat", names=["a", "b"])
    layers = formats.kohya_layers(res.state_dict)
    want = (formats.kohya_layers(_lora(1))[Q].delta() - 0.5 * formats.kohya_layers(_lora(2))[Q].delta())
    assert torch.allclose(layers[Q].delta(), want, atol=1e-5)
    assert isinstance(layers[Q], LoraLayer)
