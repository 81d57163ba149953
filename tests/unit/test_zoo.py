"""memora.zoo without ComfyUI: safe reading, format detection, key normalisation, matching and the refusal rule."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from memora import architecture, zoo

# A few real SD1.x key names (diffusers / ldm / CLIP), enough to exercise detection.
D_KEYS = ["conv_in.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
          "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight", "mid_block.resnets.0.conv1.weight",
          "up_blocks.1.attentions.0.proj_out.weight", "conv_out.bias"]
L_KEYS = ["input_blocks.0.0.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
          "middle_block.0.in_layers.2.weight", "output_blocks.3.1.proj_out.weight", "out.2.bias"]
TE_KEYS = ["text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.0.self_attn.q_proj.weight",
           "text_model.encoder.layers.0.mlp.fc1.bias", "text_model.final_layer_norm.weight"]


def _t(*shape):
    return torch.randn(*shape) if shape else torch.randn(2, 2)


def _sd(keys, prefix=""):
    return {prefix + k: _t() for k in keys}


# -- reading ---------------------------------------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_pickle_with_code_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "ran"
    obj = {"conv_in.weight": torch.ones(2), "evil": _RunsCode(str(marker))}
    path = tmp_path / "evil.pt"
    if writer == "torch_zip":
        torch.save(obj, path)
    elif writer == "torch_legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle (no torch tensors, whose plain-pickle form needs a torch global of its own)
        path.write_bytes(pickle.dumps({"conv_in.weight": _RunsCode(str(marker))}, protocol=2))
    with pytest.raises(zoo.UnsafePickleError, match=r"refused: this pickle needs Python code.*system"):
        zoo.read_file(path)
    assert not marker.exists()
    with pytest.raises(zoo.UnsafePickleError):
        zoo.load_unlearned(path)
    assert not marker.exists()


def test_reads_safetensors_and_pickles_by_content_not_extension(tmp_path):
    sd = {"conv_in.weight": torch.arange(6.0).reshape(2, 3)}
    save_file(sd, str(tmp_path / "a.bin"))  # safetensors with a .bin name
    torch.save(sd, tmp_path / "b.safetensors")  # pickle with a .safetensors name
    for name in ("a.bin", "b.safetensors"):
        got = zoo.read_file(tmp_path / name)
        assert torch.equal(got["conv_in.weight"], sd["conv_in.weight"])


def test_garbage_and_non_dict_files_are_refused(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"\x00\x01 not a model at all")
    with pytest.raises(zoo.ZooError, match="not a readable"):
        zoo.read_file(tmp_path / "g.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(zoo.ZooError, match="expected a dict of tensors"):
        zoo.read_file(tmp_path / "list.pt")
    with pytest.raises(zoo.ZooError, match="no such file"):
        zoo.read_file(tmp_path / "missing.pt")


# -- detection -------------------------------------------------------------------------------------------------------
def test_diffusers_unet_with_and_without_unet_prefix():
    for prefix in ("", "unet."):
        w = zoo.detect(_sd(D_KEYS, prefix), "x.pt")
        assert w.format == zoo.DIFFUSERS_UNET and w.unet_keys == "diffusers"
        assert sorted(w.unet) == sorted(D_KEYS) and w.text_encoder is None and not w.unknown


def test_ldm_checkpoint_keeps_unet_and_text_encoder_drops_vae_and_schedule():
    sd = {**_sd(L_KEYS, "model.diffusion_model."), **_sd(["embeddings.token_embedding.weight"],
                                                          "cond_stage_model.transformer."),
          **_sd(["text_model.final_layer_norm.weight"], "cond_stage_model.transformer."),
          "first_stage_model.decoder.conv_in.weight": _t(), "betas": _t(1000), "model_ema.decay": _t()}
    w = zoo.detect({"state_dict": sd, "global_step": 5}, "compvis.ckpt")
    assert w.format == zoo.LDM_CHECKPOINT and w.unet_keys == "ldm"
    assert sorted(w.unet) == sorted(L_KEYS)
    # old SD1 layout (no 'text_model.') is normalised to the Hugging Face names
    assert sorted(w.text_encoder) == ["text_model.embeddings.token_embedding.weight",
                                      "text_model.final_layer_norm.weight"]
    ignored = " ".join(w.ignored)
    assert "VAE" in ignored and "noise-schedule" in ignored
    assert any("state_dict" in n for n in w.notes)


def test_bare_ldm_unet_and_diffusion_model_prefix():
    for prefix in ("", "diffusion_model."):
        w = zoo.detect(_sd(L_KEYS, prefix))
        assert w.format == zoo.LDM_UNET and sorted(w.unet) == sorted(L_KEYS)


@pytest.mark.parametrize("prefix", ["", "text_encoder."])
def test_advunlearn_text_encoder_full_and_layer0(prefix):
    full = zoo.detect(_sd(TE_KEYS + ["text_model.embeddings.position_ids"], prefix))
    assert full.format == zoo.TEXT_ENCODER and full.unet is None
    assert sorted(full.text_encoder) == sorted(TE_KEYS)  # position_ids is a buffer, not a weight
    assert (prefix != "") == any("text_encoder." in n for n in full.notes)
    layer0 = zoo.detect(_sd([k for k in TE_KEYS if "layers.0" in k], prefix))
    assert layer0.format == zoo.TEXT_ENCODER and len(layer0.text_encoder) == 2


def test_ac_delta_unwraps_unet_and_text_encoder():
    obj = {"unet": _sd(D_KEYS[1:3]), "text_encoder": _sd(TE_KEYS), "modifier_token": {"<new1>": _t()}}
    w = zoo.detect(obj, "delta.bin")
    assert w.format == zoo.AC_DELTA and len(w.unet) == 2 and len(w.text_encoder) == 4
    assert any("modifier_token" in k for keys in w.ignored.values() for k in keys)
    w = zoo.detect({"unet": _sd(D_KEYS[1:3])}, "delta.bin")  # a single-key delta is not unwrapped away
    assert w.format == zoo.AC_DELTA and w.text_encoder is None
    with pytest.raises(zoo.UnrecognisedWeightsError, match="Concept Ablation"):
        zoo.detect({"unet": {"foo": _t()}}, "delta.bin")


def test_loras():
    kohya = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": _t(),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": _t(),
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}
    w = zoo.detect(kohya)
    assert w.format == zoo.KOHYA_LORA and w.lora is not None and w.unet is None
    peft = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": _t(),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": _t()}
    assert zoo.detect(peft).format == zoo.OTHER_LORA


def test_unrelated_state_dict_is_refused_with_the_known_formats():
    with pytest.raises(zoo.UnrecognisedWeightsError) as e:
        zoo.detect({"bert.encoder.layer.0.attention.self.query.weight": _t(), "classifier.bias": _t()}, "bert.bin")
    msg = str(e.value)
    assert "bert.bin" in msg and "no tensor in this file" in msg and "bert.encoder.layer.0" in msg
    for fmt in zoo.FORMATS:
        assert fmt in msg


def test_pipeline_folder_single_and_sharded(tmp_path):
    p = tmp_path / "mace"
    (p / "unet").mkdir(parents=True)
    (p / "text_encoder").mkdir()
    (p / "vae").mkdir()
    unet = _sd(D_KEYS)
    # sharded UNet with an index, as diffusers writes large models
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    save_file({k: unet[k] for k in D_KEYS[:3]}, str(p / "unet" / names[0]))
    save_file({k: unet[k] for k in D_KEYS[3:]}, str(p / "unet" / names[1]))
    import json

    (p / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: names[0] if i < 3 else names[1] for i, k in enumerate(D_KEYS)}}))
    torch.save(_sd(TE_KEYS), p / "text_encoder" / "pytorch_model.bin")
    save_file({"decoder.conv_in.weight": _t()}, str(p / "vae" / "diffusion_pytorch_model.safetensors"))
    assert zoo.is_pipeline_folder(p) and not zoo.is_pipeline_folder(p / "vae")
    w = zoo.load_unlearned(p)
    assert w.format == zoo.DIFFUSERS_PIPELINE and sorted(w.unet) == sorted(D_KEYS) and len(w.text_encoder) == 4
    assert all(torch.equal(w.unet[k], unet[k]) for k in D_KEYS)
    assert any("vae/" in r for r in w.ignored)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(zoo.UnrecognisedWeightsError, match="not a diffusers pipeline"):
        zoo.read_pipeline_folder(empty)


@pytest.mark.parametrize("shard", ["../../secret.safetensors", "/abs/secret.safetensors", "sub/x.safetensors",
                                   "..", "C:secret.safetensors", "a\\..\\b.safetensors"])
def test_shard_index_naming_a_file_outside_its_folder_is_refused(tmp_path, shard):
    import json

    models = tmp_path / "models"
    p = models / "unlearned" / "evil"
    (p / "unet").mkdir(parents=True)
    # The file the index points at exists and is readable weights: only the refusal keeps it from being read.
    outside = tmp_path / "secret.safetensors"
    save_file({"conv_in.weight": _t()}, str(outside))
    if shard.startswith("/abs/"):
        shard = str(outside)
    (p / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"conv_in.weight": shard}}))
    assert zoo.is_pipeline_folder(p)  # listed, so that loading it can say what is wrong
    with pytest.raises(zoo.ZooError, match=r"refused: the shard index names .* plain file names"):
        zoo.load_unlearned(p)


def test_shard_index_that_is_not_a_mapping_is_refused(tmp_path):
    p = tmp_path / "bad"
    (p / "unet").mkdir(parents=True)
    (p / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": ["a", "b"]}')
    with pytest.raises(zoo.ZooError, match="weight_map"):
        zoo.read_pipeline_folder(p)
    (p / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text('[1, 2]')
    with pytest.raises(zoo.ZooError, match="weight_map"):
        zoo.read_pipeline_folder(p)


# -- matching and refusal ---------------------------------------------------------------------------------------------
def _targets():
    return {"diffusion_model.a.weight": (2, 2), "diffusion_model.b.weight": (2, 2), "diffusion_model.c.weight": (3,)}


def test_match_component_counts():
    tensors = {"A": _t(), "B": _t(), "X": _t()}
    key_map = {"A": "diffusion_model.a.weight", "B": "diffusion_model.b.weight"}
    m = zoo.match_component("unet", tensors, key_map, _targets())
    assert sorted(m.matched) == ["diffusion_model.a.weight", "diffusion_model.b.weight"]
    assert m.unexpected == ["X"] and m.missing == ["diffusion_model.c.weight"] and not m.shape_mismatch
    assert m.matched_share == pytest.approx(2 / 3) and m.coverage == pytest.approx(2 / 3)
    w = zoo.UnlearnedWeights(format=zoo.DIFFUSERS_UNET, source="f")
    zoo.check_matches(w, [m])  # 2 of 3 matched: accepted (the third is reported)


def test_refusal_rule():
    w = zoo.UnlearnedWeights(format=zoo.DIFFUSERS_UNET, source="f.safetensors")
    nothing = zoo.match_component("unet", {"X": _t(), "Y": _t()}, {}, _targets())
    with pytest.raises(zoo.UnrecognisedWeightsError, match="matches nothing"):
        zoo.check_matches(w, [nothing])
    almost = zoo.match_component("unet", {"A": _t(), "X": _t(), "Y": _t()}, {"A": "diffusion_model.a.weight"},
                                 _targets())
    with pytest.raises(zoo.UnrecognisedWeightsError, match=r"almost nothing(.|\n)*unet: 1 of 3"):
        zoo.check_matches(w, [almost])
    shapes = zoo.match_component("unet", {"C": _t(4)}, {"C": "diffusion_model.c.weight"}, _targets())
    with pytest.raises(zoo.UnrecognisedWeightsError, match=r"other shapes.*file \[4\], base \[3\]"):
        zoo.check_matches(w, [shapes])


def test_compare_and_report():
    base = {"k1": torch.zeros(2, 2), "k2": torch.ones(2)}
    matched = {"k1": torch.zeros(2, 2), "k2": torch.tensor([1.0, 1.5])}
    c = zoo.compare_to_base("text_encoder", matched, base.__getitem__)
    assert c.changed == ["k2"] and c.max_abs_diff == pytest.approx(0.5)
    w = zoo.UnlearnedWeights(format=zoo.TEXT_ENCODER, source="te.pt", notes=["n1"])
    m = zoo.match_component("text_encoder", matched, {"k1": "k1", "k2": "k2"}, {"k1": (2, 2), "k2": (2,), "k3": (1,)})
    rep = zoo.format_report(w, [m], [c], None, "base.safetensors")
    assert "format detected: text_encoder" in rep and "2 tensors matched, 0 unexpected, 1 of 3" in rep
    assert "text_encoder CHANGED: 1 of 2" in rep and "note: n1" in rep
    assert zoo.summarize_keys(["clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                               "clip_l.transformer.text_model.encoder.layers.3.mlp.fc1.weight"]).startswith(
        "encoder layers [0, 3]")
    with pytest.raises(zoo.ZooError, match="NaN or infinite"):
        zoo.compare_to_base("unet", {"k1": torch.full((2, 2), float("nan"))}, base.__getitem__)


# -- which architecture a file was made for ---------------------------------------------------------------------------
def _xattn(block: str, width: int, out: int, depth: int = 0, style: str = "diffusers") -> dict[str, tuple]:
    """{key: shape} of one cross-attention's to_k / to_v as a full weight (diffusers) or a kohya LoRA (rank 4)."""
    body = f"{block}.transformer_blocks.{depth}.attn2"
    if style == "diffusers":
        return {f"{body}.to_k.weight": (out, width), f"{body}.to_v.weight": (out, width)}
    name = "lora_unet_" + body.replace(".", "_")
    return {f"{name}_to_{p}.lora_down.weight": (4, width) for p in "kv"} | \
        {f"{name}_to_{p}.lora_up.weight": (out, 4) for p in "kv"}


@pytest.mark.parametrize("width, name", [(768, "SD1.x"), (1024, "SD2.x"), (2048, "SDXL"), (1280, "SDXL refiner")])
@pytest.mark.parametrize("style", ["diffusers", "kohya"])
def test_architecture_named_from_the_cross_attention_width(width, name, style):
    shapes = _xattn("down_blocks.1.attentions.0", width, 640, style=style)
    assert architecture.context_width(shapes) == width
    assert architecture.guess_architecture(shapes) == f"{name} (cross-attention width {width})"


def test_architecture_from_the_layout_when_the_width_is_not_a_public_one():
    sd1 = _xattn("down_blocks.0.attentions.0", 64, 32) | {"down_blocks.0.attentions.0.proj_in.weight": (32, 32, 1, 1)}
    sd2 = _xattn("down_blocks.0.attentions.0", 80, 32) | {"down_blocks.0.attentions.0.proj_in.weight": (32, 32)}
    xl_deep = _xattn("down_blocks.1.attentions.0", 96, 64, depth=1, style="kohya")
    xl_no_first_level = _xattn("down_blocks.1.attentions.0", 96, 64)
    assert architecture.guess_architecture(sd1) == "an SD1.x-layout UNet (cross-attention width 64)"
    assert architecture.guess_architecture(sd2) == "an SD2.x-layout UNet (cross-attention width 80)"
    assert architecture.guess_architecture(xl_deep) == "an SDXL-layout UNet (cross-attention width 96)"
    assert architecture.guess_architecture(xl_no_first_level) == "an SDXL-layout UNet (cross-attention width 96)"
    assert architecture.guess_architecture({"input_blocks.1.1.proj_in.weight": (8, 8, 1, 1)}) == "an SD1.x-layout UNet"
    assert architecture.guess_architecture({"conv_in.weight": (32, 4, 3, 3)}) is None


def test_refusal_names_the_files_architecture_and_the_bases():
    """A UCE-style SD1.x file (cross-attention to_k / to_v only) on an SDXL base: the shapes do not fit, and the
    message says what the file was made for and what the base is."""
    file = {k: torch.zeros(s) for k, s in _xattn("down_blocks.1.attentions.0", 768, 640).items()}
    w = zoo.detect(file, "uce-sd14.safetensors")
    assert w.format == zoo.DIFFUSERS_UNET
    targets = {"diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
               "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight": (640, 2048)}
    key_map = {k.replace("diffusion_model.input_blocks.4.1", "down_blocks.1.attentions.0"): k for k in targets}
    m = zoo.match_component("unet", w.unet, key_map, targets)
    with pytest.raises(zoo.UnrecognisedWeightsError,
                       match=r"other shapes.*It was made for SD1\.x \(cross-attention width 768\); the base checkpoint "
                             r"is SDXL \(cross-attention width 2048\)\."):
        zoo.check_matches(w, [m], "SDXL (cross-attention width 2048)")


def test_receler_eraser_is_refused_by_name(tmp_path):
    eraser = {f"down_blocks.{i}.attentions.0": {"down.weight": _t(8, 320), "down.bias": _t(8),
                                                 "up.weight": _t(320, 8), "up.bias": _t(320)} for i in range(3)}
    path = tmp_path / "eraser_weights.pt"
    torch.save(eraser, path)
    with pytest.raises(zoo.UnrecognisedWeightsError, match=r"a Receler eraser .*cannot be applied as weights"):
        zoo.load_unlearned(path)
