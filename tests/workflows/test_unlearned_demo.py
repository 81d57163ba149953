"""`memora-batch demo --original BASE --unlearned FILE` with the files the unlearning literature publishes: a UNet-only
diffusers file (the UnlearnDiffAtk / AdvUnlearn zoo's `*-Diffusers-UNet.pt`), a text-encoder-only file (AdvUnlearn's
`text_encoder.text_model.*` .pt) and a partial safetensors of changed weights (ESD / UCE 2025: only the cross-attention
to_k / to_v), each built from the tiny checkpoint. memora-batch picks MemoRa Load Unlearned Model for them from the
file (memora.zoo's detection), the whole memora_recovery workflow runs through ComfyUI's executor (--quick), and the
loader's report is in the job's results record. A full checkpoint still loads with the stock CheckpointLoaderSimple."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from memora_batch import cli

pytestmark = pytest.mark.slow

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer."


def _perturbed(ck: dict, keys: list[str], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (ck[k] + 0.2 * torch.randn(ck[k].shape, generator=g)).contiguous() for k in keys}


def _hf_text_key(k: str) -> str:
    rest = k[len(TE):]
    return rest if rest.startswith("text_model.") else "text_model." + rest


@pytest.fixture(scope="module")
def unlearned_files(comfy, tiny_ckpt_path, comfy_base) -> dict:
    """{case: (file name in models/unlearned, format the report must name, what must have changed), "folder": ...}."""
    import folder_paths
    import tiny_models

    folder = comfy_base / "models" / "unlearned"
    folder.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("unlearned", str(folder), is_default=True)
    ck = load_file(str(tiny_ckpt_path))
    to_diffusers = {v: k for k, v in tiny_models.diffusers_to_ldm_unet_map().items()}
    attn_kv = sorted(k for k in ck if k.startswith(UNET) and (".attn2.to_k." in k or ".attn2.to_v." in k))
    edits = _perturbed(ck, attn_kv, 11)
    unet_full = {to_diffusers[k[len(UNET):]]: edits.get(k, v) for k, v in ck.items() if k.startswith(UNET)}
    torch.save(unet_full, folder / "ESD-Nudity-Diffusers-UNet.pt")
    partial = {to_diffusers[k[len(UNET):]]: v for k, v in _perturbed(ck, attn_kv, 12).items()}
    save_file(partial, str(folder / "esd-x-partial.safetensors"))
    layer0 = [k for k in ck if k.startswith(TE) and _hf_text_key(k).startswith("text_model.encoder.layers.0.")]
    te_edits = _perturbed(ck, layer0, 13)
    te = {"text_encoder." + _hf_text_key(k): te_edits.get(k, v) for k, v in ck.items() if k.startswith(TE)}
    torch.save(te, folder / "advunlearn-nudity-TE.pt")
    return {"unet_only": ("ESD-Nudity-Diffusers-UNet.pt", "diffusers_unet", "unet CHANGED"),
            "text_encoder_only": ("advunlearn-nudity-TE.pt", "text_encoder", "text_encoder CHANGED"),
            "partial_safetensors": ("esd-x-partial.safetensors", "diffusers_unet", "unet CHANGED"),
            "folder": folder}


def _demo(tiny_ckpt: str, unlearned: str, out, capsys) -> dict:
    rc = cli.main(["demo", "--original", tiny_ckpt, "--unlearned", unlearned, "--concept", "a photo of a star",
                   "--quick", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    (rec,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert rec["status"] == "ok", rec["error"]
    return rec


@pytest.mark.parametrize("case", ["unet_only", "text_encoder_only", "partial_safetensors"])
def test_demo_takes_every_unlearned_file_format(case, unlearned_files, tiny_ckpt, tmp_path, capsys):
    name, fmt, changed = unlearned_files[case]
    rec = _demo(tiny_ckpt, name, tmp_path / case, capsys)
    report = rec["load_reports"]["Unlearned model"]
    assert f"MemoRa unlearned model: {name} on base {tiny_ckpt}" in report, report
    assert f"format detected: {fmt} " in report, report
    assert changed in report, report
    if case == "partial_safetensors":
        n = len(load_file(str(unlearned_files["folder"] / name)))  # every cross-attention to_k / to_v
        assert f"unet (partial: merged onto the base): {n} tensors matched, 0 unexpected" in report, report
        assert f"unet CHANGED: {n} of {n} set tensors differ" in report, report
    if case == "text_encoder_only":  # the UNet is the base's: the report has no line about it
        assert "text_encoder (full): " in report, report
        assert not [ln for ln in report.splitlines() if ln.startswith("unet")], report
    assert any(m.startswith("Concept score (unlearned).") for m in rec["metrics"]), sorted(rec["metrics"])


def test_a_full_checkpoint_still_loads_with_the_checkpoint_loader(tiny_ckpt, tmp_path, capsys):
    rc = cli.main(["demo", "--original", tiny_ckpt, "--unlearned", tiny_ckpt, "--concept", "a photo of a star",
                   "--quick", "--dry-run", "--out", str(tmp_path / "full"), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert re.search(rf"^  Unlearned model +replaced by CheckpointLoaderSimple\(ckpt_name='{re.escape(tiny_ckpt)}'\)",
                     text, re.M), text


def test_an_unknown_unlearned_file_is_refused_before_anything_runs(comfy, tiny_ckpt, tmp_path, capsys):
    rc = cli.main(["demo", "--original", tiny_ckpt, "--unlearned", "no-such-eraser.pt", "--out",
                   str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--unlearned 'no-such-eraser.pt': no such checkpoint or unlearned-weights file" in err, err
    assert not (tmp_path / "x").exists()
