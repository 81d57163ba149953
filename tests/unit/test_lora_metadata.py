"""memora.lora.metadata: the one dialect written, both read, and the ModelSpec keys. No ComfyUI."""

from __future__ import annotations

import torch

from memora.lora import formats
from memora.lora import metadata as M


def _sd(cross_dim: int):
    layers = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k":
              formats.LoraLayer(torch.zeros(4, cross_dim), torch.zeros(320, 4), 4.0),
              "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
              formats.LoraLayer(torch.zeros(4, 320), torch.zeros(320, 4), 4.0)}
    return formats.layers_to_kohya(layers)


def test_sd1_lora_gets_modelspec_and_one_dialect(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    sd = _sd(768)
    meta = M.lora_metadata(sd, formats.summarize(sd), version="9.9", title="memora/recovered", concept="a parachute",
                           prediction_type="epsilon", resolution="512x512", extra={"memora.seed": "1"})
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1-lora"
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.title"] == "memora/recovered"
    assert meta["modelspec.date"] == "2023-11-14"
    assert meta["modelspec.trigger_phrase"] == "a parachute" and meta["modelspec.resolution"] == "512x512"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert (meta["memora.format"], meta["memora.layers"], meta["memora.ranks"]) == ("kohya", "2", "[4]")
    assert meta["memora.concept"] == "a parachute" and meta["memora.seed"] == "1"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "4.0")
    assert not any(k.startswith("memora_") for k in meta)


def test_architecture_follows_the_cross_attention_width():
    def arch(dim, pred=None):
        sd = _sd(dim)
        return M.lora_metadata(sd, formats.summarize(sd), version="1", title="t",
                               prediction_type=pred).get("modelspec.architecture")

    assert arch(1024) == "stable-diffusion-v2-512-lora"
    assert arch(1024, "v_prediction") == "stable-diffusion-v2-768-v-lora"
    assert arch(2048) == "stable-diffusion-xl-v1-base-lora"
    assert arch(32) is None  # unknown base: no ModelSpec claim at all


def test_old_dialect_still_reads():
    old_save = {"memora_format": "kohya", "memora_version": "0.1.0", "memora_layers": "56", "memora_params": "10",
                "memora_ranks": "[4]", "memora_merge_method": "concat", "ss_network_dim": "4"}
    got = M.read(old_save)
    assert got == {"memora.format": "kohya", "memora.pack_version": "0.1.0", "memora.layers": "56",
                   "memora.params": "10", "memora.ranks": "[4]", "memora.merge_method": "concat",
                   "ss_network_dim": "4"}
    old_train = {"memora.format": "kohya-sd lora (lora_unet_<diffusers module>.lora_down.weight / ...)",
                 "memora.layers": "128", "memora.concept": "x"}
    assert M.read(old_train) == {"memora.format": "kohya", "memora.layers": "128", "memora.concept": "x"}
    new = {"memora.format": "kohya", "memora.layers": "3"}
    assert M.read(new) == new
