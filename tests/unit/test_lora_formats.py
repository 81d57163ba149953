"""memora.lora.formats without ComfyUI: detection, conversions between kohya, diffusers-old, PEFT and ComfyUI-native
keys compared on the weight deltas, kohya name <-> module path, and the size of the MemoRa attention LoRA."""

from __future__ import annotations

import pytest
import torch

from memora.lora import formats as F

# A few SD1.x UNet module names (shapes shrunk 10x to keep the test fast): attention projections (to_out.0 has a dot inside), a transformer proj_in, resnet convs.
LINEAR = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 48),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0": (64, 64),
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj": (256, 32),
}
CONV = {
    "down_blocks.1.resnets.0.conv1": (64, 32, 3, 3),
    "up_blocks.0.resnets.1.conv_shortcut": (64, 128, 1, 1),
}
# ldm (ComfyUI) names of the same modules, as comfy.utils.unet_to_diffusers gives them for SD1.x.
LDM = {
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "middle_block.1.transformer_blocks.0.attn2.to_out.0": "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj": "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj",
    "input_blocks.4.0.in_layers.2": "down_blocks.1.resnets.0.conv1",
    "output_blocks.1.0.skip_connection": "up_blocks.0.resnets.1.conv_shortcut",
}
SHAPES = {**LINEAR, **CONV}


def _layers(rank=4, alpha=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        if len(shape) == 2:
            down = torch.randn(rank, shape[1], generator=g)
            up = torch.randn(shape[0], rank, generator=g)
        else:
            down = torch.randn(rank, shape[1], shape[2], shape[3], generator=g)
            up = torch.randn(shape[0], rank, 1, 1, generator=g)
        out[name] = F.LoraLayer(down=down, up=up, alpha=alpha)
    return out


def _deltas(sd):
    return {F.kohya_to_module(n, SHAPES): layer.delta() for n, layer in F.kohya_layers(sd).items()}


def _assert_same_deltas(a, b, tol=1e-5):
    da, db = _deltas(a), _deltas(b)
    assert set(da) == set(db)
    for k in da:
        assert da[k].shape == db[k].shape, k
        err = (da[k] - db[k]).abs().max().item() / da[k].abs().max().item()
        assert err < tol, (k, err)


def test_layer_delta_shapes_and_scale():
    layers = _layers(rank=4, alpha=2.0)
    lin = layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    conv = layers["down_blocks.1.resnets.0.conv1"]
    assert lin.rank == 4 and lin.scale == 0.5
    assert lin.delta().shape == (32, 48)
    assert torch.allclose(lin.delta(), 0.5 * lin.up @ lin.down)
    assert conv.delta().shape == (64, 32, 3, 3)
    # a conv LoRA is a 1x1 "up" after a kh x kw "down": per output pixel the same as the conv of the delta
    x = torch.randn(1, 32, 6, 6)
    y_delta = torch.nn.functional.conv2d(x, conv.delta(), padding=1)
    y_lora = 0.5 * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, conv.down, padding=1), conv.up)
    assert torch.allclose(y_delta, y_lora, atol=1e-3, rtol=1e-4)


def test_kohya_names_and_detection():
    sd = F.layers_to_kohya(_layers())
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight" in sd
    assert sd["lora_unet_down_blocks_1_resnets_0_conv1.alpha"].dim() == 0
    assert F.detect_format(sd) == F.KOHYA
    assert F.to_kohya(sd).keys() == sd.keys()


@pytest.mark.parametrize("name", list(SHAPES))
def test_kohya_name_round_trip_with_and_without_known_modules(name):
    k = F.module_to_kohya(name)
    assert F.kohya_to_module(k) == name
    assert F.kohya_to_module(k, SHAPES) == name


def test_ambiguous_underscores_resolved_by_known_modules():
    # 'conv_norm_out' is one module name; 'ff.net.0.proj' has dots where 'to_q' has an underscore.
    assert F.kohya_to_module("lora_unet_conv_norm_out") == "conv_norm_out"
    assert F.kohya_to_module("lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_ff_net_2") == \
        "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    # a module name outside the built-in vocabulary: only the list of known modules gets it right
    known = ["blocks.0.my_proj.weird_name", "blocks.0.other"]
    assert F.kohya_to_module("lora_unet_blocks_0_my_proj_weird_name") == "blocks.0.my.proj.weird.name"
    assert F.kohya_to_module("lora_unet_blocks_0_my_proj_weird_name", known) == "blocks.0.my_proj.weird_name"
    with pytest.raises(F.LoraFormatError, match="matches no module"):
        F.kohya_to_module("lora_unet_blocks_1_other", known)
    with pytest.raises(F.LoraFormatError, match="same kohya name"):
        F.kohya_to_module("lora_unet_a_b_c", ["a.b_c", "a_b.c"])


def test_text_encoder_names():
    name = "text_model.encoder.layers.3.self_attn.q_proj"
    assert F.kohya_to_module(F.module_to_kohya(name, F.TE_PREFIX)) == name


def test_peft_round_trip_folds_alpha():
    sd = F.layers_to_kohya(_layers(alpha=2.0))
    peft = F.kohya_to_diffusers(sd, known_modules=SHAPES)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_A.weight" in peft
    assert F.detect_format(peft) == F.PEFT
    back = F.to_kohya(peft)
    assert all(float(v) == 4.0 for k, v in back.items() if k.endswith(".alpha"))  # no alpha in PEFT: scale 1
    _assert_same_deltas(sd, back)


def test_peft_prefixes_and_adapter_names():
    sd = F.layers_to_kohya(_layers())
    peft = F.kohya_to_diffusers(sd)
    wrapped = {"base_model.model." + k[len("unet."):]: v for k, v in peft.items()}
    bare = {k[len("unet."):]: v for k, v in peft.items()}
    named = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
             for k, v in peft.items()}
    for variant in (wrapped, bare, named):
        assert F.detect_format(variant) == F.PEFT
        _assert_same_deltas(sd, F.to_kohya(variant))


def test_peft_alpha_given():
    sd = F.layers_to_kohya(_layers(alpha=4.0))  # scale 1: nothing folded
    peft = F.kohya_to_diffusers(sd)
    back = F.to_kohya(peft, alpha=8.0)
    for layer in F.kohya_layers(back).values():
        assert layer.scale == 2.0


def test_peft_conversion_agrees_with_diffusers_convert_state_dict_to_kohya():
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    sd = F.layers_to_kohya(_layers(alpha=4.0))
    peft = F.kohya_to_diffusers(sd)
    ours = F.to_kohya(peft)
    theirs = convert_state_dict_to_kohya(peft)
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k].float(), theirs[k].float()), k


def test_diffusers_old_round_trip_both_spellings():
    sd = F.layers_to_kohya(_layers(alpha=4.0))
    peft = F.kohya_to_diffusers(sd)
    # what the MemoRa reference writes
    old = {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
           for k, v in peft.items()}
    assert F.detect_format(old) == F.DIFFUSERS_OLD
    _assert_same_deltas(sd, F.to_kohya(old))
    # the attention-processor spelling (to_out_lora means to_out.0)
    proc = {}
    for k, v in old.items():
        for p in ("to_q", "to_k", "to_v", "to_out.0"):
            tail = f".{p}.lora."
            if tail in k:
                short = p.split(".")[0]
                k = k.replace(tail, f".processor.{short}_lora.")
        proc[k] = v
    assert any(".processor.to_out_lora.down.weight" in k for k in proc)
    assert F.detect_format(proc) == F.DIFFUSERS_OLD
    _assert_same_deltas(sd, F.to_kohya(proc))


def test_comfy_native_round_trip_with_flattened_convs():
    sd = F.layers_to_kohya(_layers(alpha=2.0))
    inv = {d: ldm for ldm, d in LDM.items()}
    native = {}
    for name, layer in F.kohya_layers(sd).items():
        ldm = inv[F.kohya_to_module(name, SHAPES)]
        native[f"diffusion_model.{ldm}.lora_up.weight"] = layer.up.flatten(1)       # core TrainLoraNode's shapes
        native[f"diffusion_model.{ldm}.lora_down.weight"] = layer.down.flatten(1)
        native[f"diffusion_model.{ldm}.alpha"] = torch.tensor(layer.alpha)
    assert F.detect_format(native) == F.COMFY
    with pytest.raises(F.LoraFormatError, match="ldm -> diffusers"):
        F.to_kohya(native)
    back = F.to_kohya(native, LDM, weight_shapes=SHAPES)
    assert back["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert back["lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight"].shape == (64, 4, 1, 1)
    _assert_same_deltas(sd, back, tol=1e-6)
    with pytest.raises(F.LoraFormatError, match="match no module"):
        F.to_kohya({**native, "diffusion_model.nowhere.lora_up.weight": torch.zeros(2, 4)}, LDM)


def test_comfy_native_full_diffs_kept_as_kohya_diffs():
    native = {"diffusion_model.input_blocks.4.0.in_layers.2.diff_b": torch.ones(64)}
    native["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight"] = torch.ones(320, 2)
    native["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight"] = torch.ones(2, 320)
    back = F.to_kohya(native, LDM)
    assert torch.equal(back["lora_unet_down_blocks_1_resnets_0_conv1.diff_b"], torch.ones(64))
    assert F.summarize(back)["full_diffs"] == 1
    with pytest.raises(F.LoraFormatError, match="full-weight diff"):
        F.kohya_to_diffusers(back)


def test_kohya_variants_lycoris_te1_ldm_names_missing_alpha():
    sd = F.layers_to_kohya(_layers(alpha=4.0))
    lyc = {("lycoris_" + k[len("lora_unet_"):]): v for k, v in sd.items()}
    _assert_same_deltas(sd, F.to_kohya(lyc))
    inv = {d.replace(".", "_"): ldm.replace(".", "_") for ldm, d in LDM.items()}
    ldm_named = {}
    for k, v in sd.items():
        name, _, suffix = k[len("lora_unet_"):].partition(".")
        ldm_named[f"lora_unet_{inv[name]}.{suffix}"] = v
    _assert_same_deltas(sd, F.to_kohya(ldm_named, LDM))
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    _assert_same_deltas(sd, F.to_kohya(no_alpha))  # alpha 4 = rank 4: same as the implicit scale 1
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 8),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(8, 2)}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in F.to_kohya(te)


def test_detect_format_errors():
    with pytest.raises(ValueError, match="empty"):
        F.detect_format({})
    with pytest.raises(ValueError) as e:
        F.detect_format({"model.weight": torch.zeros(1), "foo.bias": torch.zeros(1)})
    msg = str(e.value)
    for fmt in F.FORMATS:
        assert fmt in msg
    assert "foo.bias" in msg
    with pytest.raises(ValueError, match="mixes formats"):
        F.detect_format({"lora_unet_x.lora_down.weight": torch.zeros(1), "unet.x.lora_A.weight": torch.zeros(1)})


def test_inconsistent_files_rejected():
    sd = F.layers_to_kohya(_layers())
    k = next(k for k in sd if k.endswith(".lora_up.weight"))
    missing_up = {kk: v for kk, v in sd.items() if kk != k}
    with pytest.raises(F.LoraFormatError, match="no matching"):
        F.to_kohya(missing_up)
    bad_rank = dict(sd)
    bad_rank[k] = torch.zeros(sd[k].shape[0], 3)
    with pytest.raises(F.LoraFormatError, match="ranks differ"):
        F.kohya_layers(bad_rank)
    peft = F.kohya_to_diffusers(sd)
    peft.pop(next(k for k in peft if k.endswith("lora_B.weight")))
    with pytest.raises(F.LoraFormatError, match="no matching"):
        F.to_kohya(peft)


def _attention_count(unet, rank):
    layers = params = 0
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
            layers += 1
            params += rank * (mod.in_features + mod.out_features)
    return layers, params


def test_memora_attention_lora_size_on_sd1x():
    """The MemoRa recipe's target set on the real SD1.x UNet (built on the meta device: no weights, no download)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    layers, params = _attention_count(unet, 4)
    print(f"\nSD1.x attention-only rank-4 LoRA: {layers} layers, {params:,} parameters")
    assert (layers, params) == (128, 797_184)
