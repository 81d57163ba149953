"""memora.lora.apply (the one delta formula, wrapper and call counter), the training loop's loss-scaling check,
and the concept prompt read from ComfyUI's API prompt (memora.lora.conditioning). No ComfyUI."""

from __future__ import annotations

import pytest
import torch

from memora.lora import apply as A
from memora.lora import conditioning, formats
from memora.lora import recipe as R
from memora.lora import train as T


def _layer(shape, rank=3, alpha=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = T.LoRALayerParams(shape, rank, alpha, generator=g)
    with torch.no_grad():
        layer.up.copy_(torch.randn(layer.up.shape, generator=g))
    return layer


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 3, 3)])
def test_one_delta_formula_for_training_files_and_wrappers(shape):
    layer = _layer(shape)
    manual = (layer.up.detach().flatten(1) @ layer.down.detach().flatten(1)).reshape(shape) * layer.scale
    as_file = layer.to_layer()
    counter = A.CallCounter()
    wrapped = A.LoraWeightWrapper("w", as_file, counter)(torch.zeros(shape))
    assert torch.equal(layer.delta().detach(), manual)
    assert torch.equal(as_file.delta(), manual)
    assert torch.equal(wrapped, manual) and counter.calls == {"w": 1}


def test_wrapper_adds_in_fp32_and_keeps_the_weight_dtype_and_gradients():
    layer = _layer((4, 4))
    w16 = torch.randn(4, 4).half()
    out = A.LoraWeightWrapper("w", layer, A.CallCounter())(w16)
    assert out.dtype == torch.float16
    assert torch.equal(out, (w16.float() + layer.delta().detach()).half())
    A.LoraWeightWrapper("w", layer, A.CallCounter())(torch.zeros(4, 4)).sum().backward()
    assert layer.up.grad is not None and layer.up.grad.abs().sum() > 0


def test_switch_and_counter_prove_every_wrapper_ran():
    counter, switch = A.CallCounter(), A.LoraSwitch()
    wrappers = [A.LoraWeightWrapper(f"k{i}", _layer((3, 3), seed=i).to_layer(), counter, switch) for i in range(3)]
    w = torch.ones(3, 3)
    assert all(torch.equal(f(w), w) for f in wrappers) and counter.calls == {"k0": 0, "k1": 0, "k2": 0}
    switch.on = True
    before = counter.snapshot()
    wrappers[0](w), wrappers[2](w)
    with pytest.raises(A.LoraNotAppliedError, match=r"Guider: the LoRA was not applied to 1 of 3 LoRA layers.*'k1'"):
        counter.check(before, "Guider")
    wrappers[1](w)
    counter.check(before, "Guider")


def test_rank_mismatch_is_refused():
    bad = formats.LoraLayer(down=torch.zeros(2, 4), up=torch.zeros(4, 3), alpha=1.0)
    with pytest.raises(ValueError, match="down has rank 2 but up has rank 3"):
        A.LoraWeightWrapper("k", bad, A.CallCounter())


def test_layer_names_and_module_map():
    keys = ["a.lora_down.weight", "a.lora_up.weight", "a.alpha", "b.diff", "b.diff_b", "c.dora_scale", "plain"]
    assert A.layer_names(keys) == ["a", "b", "c", "plain"]
    m = A.module_map({"down_blocks.0.x.to_q.weight": "input_blocks.1.1.x.to_q.weight",
                      "down_blocks.0.x.proj.bias": "input_blocks.1.1.x.proj.bias", "odd": "odd"})
    assert m == {"input_blocks.1.1.x.to_q": "down_blocks.0.x.to_q", "input_blocks.1.1.x.proj": "down_blocks.0.x.proj"}


# -- loss scaling --------------------------------------------------------------------------------------------------
def test_loss_scaling_works_on_the_cpu():
    layers = {"l": _layer((4, 4))}
    net = torch.nn.ModuleDict({"l": torch.nn.Linear(4, 4, bias=False)}).requires_grad_(False)
    recipe = R.LoRARecipe(steps=2, rank=3, alpha=1.5, batch_size=1, gradient_accumulation=1, random_flip=False)
    sched = T.DiffusionSchedule(torch.linspace(0.99, 0.1, 10))

    def predict(x, t, c):
        with T.attach_lora(net, layers):
            return net["l"](x.reshape(-1, 4)).reshape(x.shape)

    res = T.train_lora(predict, torch.randn(2, 1, 2, 2), layers, recipe, sched, torch.Generator().manual_seed(0),
                       loss_scaling=True)
    assert len(res.losses) == 2 and all(v > 0 for v in res.losses)
    assert layers["l"].up.abs().sum() > 0  # the scaled step was taken


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA (torch then disables the scaler)")
def test_loss_scaling_that_torch_disables_is_an_error_not_a_silent_fp16_run():
    with pytest.raises(T.LossScalingUnavailableError, match="disabled its GradScaler for device 'cuda'"):
        T.grad_scaler(torch.device("cuda"), True)
    assert T.grad_scaler(torch.device("cuda"), False) is None
    recipe = R.LoRARecipe(steps=1, rank=3, alpha=1.5)
    with pytest.raises(T.LossScalingUnavailableError):  # refused before any work
        T.train_lora(lambda x, t, c: x, torch.randn(2, 1, 2, 2), {"l": _layer((4, 4))}, recipe,
                     T.DiffusionSchedule(torch.linspace(0.99, 0.1, 10)), torch.Generator(), device="cuda",
                     loss_scaling=True)


# -- the concept prompt ----------------------------------------------------------------------------------------------
def test_concept_is_found_through_string_nodes_and_conditioning_nodes():
    prompt = {
        "1": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a photo of the parachute"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": ["1", 0], "clip": ["9", 1]}},
        "3": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["2", 0], "start": 0.0}},
        "4": {"class_type": "MemoRaLoRATrain", "inputs": {"positive": ["3", 0]}},
        "5": {"class_type": "MemoRaLoRATrain", "inputs": {"positive": ["2", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "typed in", "clip": ["9", 1]}},
        "7": {"class_type": "MemoRaLoRATrain", "inputs": {"positive": ["6", 0]}},
        "8": {"class_type": "MemoRaLoRATrain", "inputs": {"positive": ["9", 0]}},
        "9": {"class_type": "SomeLoader", "inputs": {"ckpt_name": "x.safetensors"}},
    }
    assert conditioning.concept_from_prompt(prompt, "4") == "a photo of the parachute"
    assert conditioning.concept_from_prompt(prompt, 5) == "a photo of the parachute"
    assert conditioning.concept_from_prompt(prompt, "7") == "typed in"
    assert conditioning.concept_from_prompt(prompt, "8") == ""
    assert conditioning.concept_from_prompt(None, "4") == ""
    loop = {"1": {"inputs": {"conditioning": ["2", 0]}}, "2": {"inputs": {"conditioning": ["1", 0]}},
            "3": {"inputs": {"positive": ["1", 0]}}}
    assert conditioning.concept_from_prompt(loop, "3") == ""
