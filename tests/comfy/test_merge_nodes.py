"""MemoRa Multi-LoRA Merge on the tiny SD1.x model, through ComfyUI's executor and stock LoRA loading."""

from __future__ import annotations

import json

import probes
import pytest
import torch

from random_loras import lora_targets, pack_module, random_kohya_lora, write_lora

PROMPT = "a photo of the parachute"


@pytest.fixture(scope="module")
def loras(comfy, comfy_base, loaded_tiny):
    """Two LoRAs of ranks 4 and 8 over the attention projections (B also over the conv proj_in/proj_out)."""
    model = loaded_tiny[0]
    a = random_kohya_lora(lora_targets(model), rank=4, seed=21, alpha=4.0)
    b = random_kohya_lora(lora_targets(model, with_conv=True), rank=8, seed=22, alpha=2.0)
    folder = comfy_base / "models" / "loras"
    return {"a": (write_lora(folder, "merge_test_a.safetensors", a), a),
            "b": (write_lora(folder, "merge_test_b.safetensors", b), b)}


def test_concat_merge_samples_like_stacked_loras(comfy, tiny_ckpt, loras, output_dir):
    """Sampling with the concat-merged LoRA == sampling with the two LoRAs stacked at their weights (fp32, 1e-5
    relative); the svd merge at automatic (full) rank too; weight 0 leaves a LoRA out."""
    errs = probes.merged_vs_stacked(comfy, tiny_ckpt, loras["a"][0], loras["b"][0], output_dir, "merge_test")
    print("merged vs stacked, max abs diff / max abs value:", errs)
    assert errs["visible"] > 1e-2, "the test LoRAs must change sampling visibly"
    assert errs["concat"] < 1e-5 and errs["svd"] < 1e-5 and errs["zero_b"] < 1e-5


def _merge(*args, **kwargs):
    import nodes

    with torch.inference_mode():
        return nodes.NODE_CLASS_MAPPINGS["MemoRaMultiLoRAMerge"].execute(*args, **kwargs)


def _deltas(sd):
    from memora.lora import formats

    return {n: layer.delta() for n, layer in formats.kohya_layers(sd).items()}


def test_kohya_and_diffusers_inputs_merge_and_ranks_4_and_8(comfy, loras):
    from memora.lora import formats

    a, b = loras["a"][1], loras["b"][1]
    b_peft = formats.kohya_to_diffusers(b)
    assert formats.detect_format(b_peft) == formats.PEFT
    out = _merge(lora_1=a, weight_1=1.0, lora_2=b_peft, weight_2=0.5, method="concat", rank=0, density=0.5, seed=0,
                 save_name="")
    merged, report, filename = out[0], out[1], out[2]
    assert filename == ""
    ref = _merge(lora_1=a, weight_1=1.0, lora_2=b, weight_2=0.5, method="concat", rank=0, density=0.5, seed=0,
                 save_name="")[0]
    da, db = _deltas(merged), _deltas(ref)
    assert da.keys() == db.keys()
    assert max(float((da[k] - db[k]).abs().max()) for k in da) < 1e-6
    ranks = {layer.rank for layer in formats.kohya_layers(merged).values()}
    assert ranks == {12, 8}   # attention layers: 4 + 8; conv layers only in b: 8
    assert "peft format" in report and "kohya format" in report


def test_svd_report_and_incompatible_shapes(comfy, loras):
    a, b = loras["a"][1], loras["b"][1]
    out = _merge(lora_1=a, weight_1=1.0, lora_2=b, weight_2=1.0, method="svd", rank=2, density=0.5, seed=0,
                 save_name="")
    report = out[1]
    assert "method svd" in report and "energy kept" in report
    lines = [ln for ln in report.splitlines() if ln.startswith("lora_unet_") and "energy kept" in ln]
    assert lines and all(0.0 < float(ln.rsplit(" ", 1)[1]) < 1.0 for ln in lines)

    bad = dict(b)
    key = sorted(k for k in a if k.endswith(".lora_down.weight"))[0]
    layer = key[: -len(".lora_down.weight")]
    bad[key] = torch.randn(8, a[key].shape[1] + 5)
    bad[f"{layer}.lora_up.weight"] = torch.randn(a[f"{layer}.lora_up.weight"].shape[0], 8)
    with pytest.raises(ValueError, match=layer):
        _merge(lora_1=a, weight_1=1.0, lora_2=bad, weight_2=1.0, method="concat", rank=0, density=0.5, seed=0,
               save_name="")


def test_save_is_atomic_never_overwrites_and_records_sources(comfy, loras, comfy_base):
    from safetensors import safe_open

    a, b = loras["a"][1], loras["b"][1]
    root = pack_module("nodes._lora_host").loras_root()
    kw = dict(lora_1=a, weight_1=1.0, lora_2=b, weight_2=0.25, method="dare_ties", rank=6, density=0.7, seed=5,
              save_name="memora_test/merged")
    first = _merge(**kw)
    second = _merge(**kw)
    assert first[2] != second[2], "a second save must not reuse the name"
    for out in (first, second):
        path = root / out[2]
        assert path.is_file()
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            saved = {k: f.get_tensor(k) for k in f.keys()}
        assert meta["memora.merge_method"] == "dare_ties" and meta["memora.merge_seed"] == "5"
        sources = json.loads(meta["memora.merge_sources"])
        assert [(s["slot"], s["weight"], s["format"]) for s in sources] == [(1, 1.0, "kohya"), (2, 0.25, "kohya")]
        assert saved.keys() == out[0].keys()
        assert all(torch.equal(saved[k], out[0][k]) for k in saved)
    # the same seed gave the same merge
    assert all(torch.equal(first[0][k], second[0][k]) for k in first[0])
    before = sorted(p.name for p in (root / "memora_test").iterdir())
    with pytest.raises(ValueError, match="save_name"):
        _merge(**{**kw, "save_name": "../escape"})
    assert sorted(p.name for p in (root / "memora_test").iterdir()) == before
    assert not (root.parent / "escape_00001_.safetensors").exists()
