"""MemoRa on Flux LoRAs, on the tiny Flux-family model (tests/support/tiny_flux.py) through ComfyUI's own loaders,
LoRA machinery and executor: flow-matching training (base untouched, output changed, loss down), the file loading
with every key in LoraLoader and in diffusers' Flux LoRA loader, the sd-scripts (kohya) Flux names, MemoRa Load
Unlearned Model with EraseAnything-style LoRAs and UCE-Flux-style projection weights, AutoMemoRa and Multi-LoRA
Merge identities, and the refusals (an SD LoRA on Flux, a Flux LoRA on SD, mixed merges)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphs import Graph, run_logged, sampled_preview
from memora.lora import flow as F
from memora.lora import flux as FX
from memora.lora import formats
from random_loras import pack_module

# 2 double blocks x 8 attention projections + 2 single blocks x 3 (q, k, v)
TINY_ATTENTION_LAYERS = 22
# the ComfyUI weights they live in: img/txt qkv + img/txt proj per double block, linear1 per single block
TINY_ATTENTION_WEIGHTS = 10


def _pack(name: str, package: str = "nodes"):
    return pack_module(f"{package}.{name}")


def _node(name: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


def _train_inputs(**kw):
    args = dict(steps=8, rank=4, alpha=4.0, learning_rate=5e-3, lr_schedule="constant", batch_size=2,
                gradient_accumulation=1, targets="attention", random_flip=True, precision="auto",
                gradient_checkpointing=False, seed=2024, save_name="memora_test/flux")
    args.update(kw)
    return args


def _velocity(model, x, sigma: float, cond) -> torch.Tensor:
    """The MODEL's velocity at x (ComfyUI's own model call: apply_model with the conditioning's extra conds)."""
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(cond, cond)
    guider.set_cfg(1.0)
    out = {}

    class _Probe(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                   disable_pbar=False):
            s = torch.full((x.shape[0],), sigma)
            out["v"] = (x - model_wrap(x, s, **extra_args)) / sigma
            return torch.zeros_like(x)

    with torch.inference_mode():
        guider.sample(torch.zeros_like(x), x, _Probe(), torch.tensor([sigma, 0.0]), seed=0, disable_pbar=True)
    return out["v"]


@pytest.fixture(scope="module")
def flux(comfy, comfy_base):
    import tiny_flux

    files = {"dev": tiny_flux.install_tiny_flux(comfy_base, "dev")}
    model = tiny_flux.load_tiny_flux("dev")
    cond = tiny_flux.tiny_flux_conditioning(guidance=3.5)
    latents = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    return {"files": files, "model": model, "cond": cond, "latents": latents, "x": x}


@pytest.fixture(scope="module")
def trained(flux):
    model, cond = flux["model"], flux["cond"]
    before_weights = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    before_v = _velocity(model, flux["x"], 0.6, cond)
    with torch.inference_mode():
        out = _node("MemoRaLoRATrain").execute(model, {"samples": flux["latents"]}, cond, **_train_inputs())
    return {"out": out.result if hasattr(out, "result") else out, "before_weights": before_weights,
            "before_v": before_v}


def test_training_leaves_the_base_untouched_and_changes_the_output(flux, trained):
    model = flux["model"]
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in trained["before_weights"].items())
    assert not model.patches and not model.weight_wrapper_patches
    assert torch.equal(_velocity(model, flux["x"], 0.6, flux["cond"]), trained["before_v"])
    out_model, lora_sd, loss, filename = trained["out"][:4]
    assert len(lora_sd) == 2 * TINY_ATTENTION_LAYERS
    assert set(FX.flux_layers(lora_sd)) == {m for m in FX.block_module_shapes(128, 2, 2) if FX.is_target(m, "attention")}
    assert len(out_model.patches) == TINY_ATTENTION_WEIGHTS
    v = _velocity(out_model, flux["x"], 0.6, flux["cond"])
    assert (v - trained["before_v"]).abs().max() > 1e-4


def test_flow_schedule_uses_the_models_own_shift_and_the_velocity_target(flux):
    """t = the model's sampler sigma at a logit-normal u; x_t = (1 - t) x0 + t eps; target eps - x0; the predict
    adapter returns ComfyUI's own velocity (x_t - denoised) / t."""
    tm = _pack("_train_model")
    model = flux["model"]
    sched = tm.diffusion_schedule(model)
    assert isinstance(sched, F.FlowSchedule) and tm.prediction_type(model) == F.FLOW
    ms = model.get_model_object("model_sampling")
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(sched.times(u).double(), ms.sigma(u).double(), atol=1e-6)
    assert torch.allclose(sched.times(u).double(), F.flux_time_shift(1.15, u), atol=1e-6)
    t = sched.draw_timesteps(20000, torch.Generator().manual_seed(0)).double()
    # logit-normal(0, 1) pushed through flux_time_shift(1.15): median = shift(0.5)
    assert abs(float(t.median()) - float(F.flux_time_shift(1.15, torch.tensor(0.5)))) < 0.01
    x0, eps = flux["latents"][:2], torch.randn(2, 16, 8, 8)
    tt = torch.tensor([0.25, 0.75])
    assert torch.allclose(sched.add_noise(x0, eps, tt)[1], 0.25 * x0[1] + 0.75 * eps[1])
    assert torch.equal(sched.target(x0, eps, tt), eps - x0)


def test_training_lowers_the_flow_matching_loss(flux, trained):
    th = _pack("_train_host")
    before = th.recipe_loss(flux["model"], flux["cond"], flux["latents"], repeats=4)
    after = th.recipe_loss(trained["out"][0], flux["cond"], flux["latents"], repeats=4)
    assert after < before * 0.995, (before, after)  # random latents: most of the loss is irreducible


def _lora_name(trained) -> str:
    return trained["out"][3]


def _load_in_lora_loader(comfy, flux, lora_name: str):
    """UNETLoader (the tiny Flux dev file) -> stock LoraLoaderModelOnly through the executor; (model, log lines)."""
    g = Graph()
    un = g.node("UNETLoader", unet_name=flux["files"]["dev"]["diffusion_model"], weight_dtype="default")
    lo = g.node("LoraLoaderModelOnly", model=un[0], lora_name=lora_name, strength_model=1.0)
    ck = g.node("CheckpointLoaderSimple", ckpt_name=flux["files"]["dev"]["checkpoint"])
    pos = g.node("FluxGuidance", conditioning=g.node("CLIPTextEncode", text="a photo", clip=ck[1])[0], guidance=3.5)
    lat = g.node("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    sampled_preview(g, lo[0], pos[0], lat[0], ck[2], seed=1, steps=2, cfg=1.0, sampler_name="euler",
                    scheduler="simple")
    res, messages = run_logged(comfy, g.prompt)
    assert res.success, res.error_message
    return comfy.node_outputs(lo.id)[0], messages


def _patch_count(model) -> int:
    return sum(len(p) for p in model.patches.values())


def test_saved_file_loads_every_key_in_stock_lora_loader(comfy, flux, trained):
    name = _lora_name(trained)
    file_sd = load_file(str(_pack("_lora_host").loras_root() / name))
    assert set(file_sd) == set(trained["out"][1])
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in file_sd)
    loaded, messages = _load_in_lora_loader(comfy, flux, name)
    assert not [m for m in messages if "lora key not loaded" in m or "shape mismatch" in m], messages
    assert len(loaded.patches) == TINY_ATTENTION_WEIGHTS and _patch_count(loaded) == TINY_ATTENTION_LAYERS
    a = _velocity(loaded, flux["x"], 0.6, flux["cond"])
    b = _velocity(trained["out"][0], flux["x"], 0.6, flux["cond"])
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_sd_scripts_flux_names_load_every_key_and_patch_the_same_weights(comfy, flux, trained):
    """The same LoRA written with kohya sd-scripts' Flux names (fused qkv / linear1 layers) patches every weight it
    names and gives the same model."""
    lh = _pack("_lora_host")
    layers = FX.flux_layers(trained["out"][1])
    kohya = FX.to_kohya_bfl(layers, hidden_size=128)
    assert {k.split(".")[0] for k in kohya} == {f"lora_unet_double_blocks_{i}_{m}" for i in range(2) for m in (
        "img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj")} | {
        f"lora_unet_single_blocks_{i}_linear1" for i in range(2)}
    model, report = lh.apply_lora(flux["model"], kohya)
    assert len(report.patched) == TINY_ATTENTION_WEIGHTS and not report.unmatched
    a = _velocity(model, flux["x"], 0.6, flux["cond"])
    b = _velocity(trained["out"][0], flux["x"], 0.6, flux["cond"])
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_saved_file_loads_every_key_in_diffusers(flux, trained):
    """diffusers' Flux LoRA reader (FluxPipeline.lora_state_dict) and loader (load_lora_into_transformer) on a tiny
    FluxTransformer2DModel: every LoRA layer lands on its module, and fusing adds exactly the LoRA's delta."""
    import tiny_flux
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin as FluxPipeline  # FluxPipeline's LoRA loader
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    path = _pack("_lora_host").loras_root() / _lora_name(trained)
    layers = FX.flux_layers(trained["out"][1])
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**tiny_flux.DIFFUSERS_CONFIG)
    before = {m: transformer.get_submodule(m).weight.detach().clone() for m in layers}
    sd, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas, transformer=transformer, adapter_name="memora")
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    adapted = {n for n, m in transformer.named_modules() if isinstance(m, PeftLoraLayer)}
    assert adapted == set(layers)
    transformer.fuse_lora(adapter_names=["memora"])
    for m, layer in layers.items():
        delta = transformer.get_submodule(m).base_layer.weight.detach() - before[m] if hasattr(
            transformer.get_submodule(m), "base_layer") else transformer.get_submodule(m).weight.detach() - before[m]
        assert torch.allclose(delta, layer.delta(), atol=1e-6), m


# -- random Flux LoRAs (EraseAnything ships diffusers-format Flux LoRAs like these) ---------------------------------
def _random_flux_lora(seed: int, rank: int = 2, magnitude: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for module, (out, inn) in sorted(FX.block_module_shapes(128, 2, 2).items()):
        if FX.is_target(module, "attention"):
            layers[module] = formats.LoraLayer(down=torch.randn(rank, inn, generator=g) / inn ** 0.5,
                                               up=torch.randn(out, rank, generator=g) * magnitude, alpha=float(rank))
    return FX.to_diffusers(layers)


def _sd_lora(seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya SD1.x LoRA (attention of the first down block; cross-attention width 768)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for proj, inn in (("attn2_to_k", 768), ("attn2_to_v", 768), ("attn1_to_q", 320)):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_{proj}"
        sd[f"{name}.lora_down.weight"] = torch.randn(4, inn, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(320, 4, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(4.0)
    return sd


def _unlearned(comfy_base, flux, name: str, sd: dict, strength: float = 1.0):
    import folder_paths

    folder = Path(comfy_base) / "models" / "unlearned"
    folder.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("unlearned", str(folder), is_default=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / name))
    with torch.inference_mode():
        out = _node("MemoRaLoadUnlearnedModel").execute(flux["files"]["dev"]["checkpoint"], f"unlearned/{name}",
                                                       strength)
    return out.result if hasattr(out, "result") else out


def test_unlearned_loader_applies_an_erase_anything_style_flux_lora(comfy, comfy_base, flux):
    lh = _pack("_lora_host")
    lora = _random_flux_lora(11)
    model, clip, vae, report = _unlearned(comfy_base, flux, "ea_flux_lora.safetensors", lora)
    assert "format detected: lora" in report
    assert f"CHANGED by LoRA: {TINY_ATTENTION_LAYERS} of {TINY_ATTENTION_LAYERS} layers matched, " \
           f"{TINY_ATTENTION_WEIGHTS} weights patched" in report, report
    expected, _rep = lh.apply_lora(flux["model"], lora)
    a, b = _velocity(model, flux["x"], 0.6, flux["cond"]), _velocity(expected, flux["x"], 0.6, flux["cond"])
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, _velocity(flux["model"], flux["x"], 0.6,
                                                                              flux["cond"]), atol=1e-3)


def test_unlearned_loader_merges_uce_flux_style_projection_weights(comfy, comfy_base, flux):
    """A partial diffusers-keyed Flux file holding edited text-stream key / value projections (what UCE-Flux edits)
    replaces exactly those rows of ComfyUI's fused txt_attn.qkv weights and nothing else."""
    base = {k: v.clone() for k, v in flux["model"].model.diffusion_model.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    edited = {f"transformer.transformer_blocks.{i}.attn.{p}.weight": torch.randn(128, 128, generator=g) * 0.05
              for i in range(2) for p in ("add_k_proj", "add_v_proj")}
    model, _clip, _vae, report = _unlearned(comfy_base, flux, "uce_flux.safetensors", edited)
    assert "format detected: flux_transformer" in report and "unet (partial: merged onto the base): 4 tensors " \
           "matched, 0 unexpected" in report, report
    assert "unet CHANGED: 4 of 4 set tensors differ" in report
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    patched = model.model.diffusion_model.state_dict()
    for k, v in base.items():
        if k.endswith("txt_attn.qkv.weight"):
            i = int(k.split(".")[1])
            want = v.clone()
            want[128:256] = edited[f"transformer.transformer_blocks.{i}.attn.add_k_proj.weight"]
            want[256:384] = edited[f"transformer.transformer_blocks.{i}.attn.add_v_proj.weight"]
            assert torch.equal(patched[k], want), k
        else:
            assert torch.equal(patched[k], v), k
    comfy.model_management.unload_all_models()


def test_unlearned_loader_refuses_an_sd_lora_on_flux(comfy, comfy_base, flux):
    import memora.zoo  # noqa: F401  (the pack's own copy raises; compare by message)

    with pytest.raises(ValueError) as e:
        _unlearned(comfy_base, flux, "sd_lora.safetensors", _sd_lora())
    msg = str(e.value)
    assert "match no weight" in msg and "SD1.x (cross-attention width 768)" in msg and "Flux dev" in msg, msg


# -- AutoMemoRa and Multi-LoRA Merge -------------------------------------------------------------------------------
def _guided_velocity(guider_node_out, x, sigma: float) -> torch.Tensor:
    guider = guider_node_out[0]
    out = {}
    import comfy.samplers

    class _Probe(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                   disable_pbar=False):
            out["v"] = (x - model_wrap(x, torch.full((x.shape[0],), sigma), **extra_args)) / sigma
            return torch.zeros_like(x)

    with torch.inference_mode():
        guider.sample(torch.zeros_like(x), x, _Probe(), torch.tensor([sigma, 0.0]), seed=0, disable_pbar=True)
    return out["v"]


def _auto(flux, lora, w: float):
    with torch.inference_mode():
        out = _node("MemoRaAutoGuider").execute(flux["model"], lora, flux["cond"], flux["cond"], 1.0, w, "lora")
    return out.result if hasattr(out, "result") else out


def test_automemora_identities_on_flux(flux):
    lh = _pack("_lora_host")
    lora = _random_flux_lora(21)
    x = flux["x"]
    plain, _ = lh.apply_lora(flux["model"], lora)
    v_lora, v_base = _velocity(plain, x, 0.6, flux["cond"]), _velocity(flux["model"], x, 0.6, flux["cond"])
    assert torch.allclose(_guided_velocity(_auto(flux, lora, 1.0), x, 0.6), v_lora, atol=1e-5)
    assert torch.allclose(_guided_velocity(_auto(flux, lora, 0.0), x, 0.6), v_base, atol=1e-5)
    v2 = _guided_velocity(_auto(flux, lora, 2.0), x, 0.6)
    assert torch.allclose(v2, v_base + 2.0 * (v_lora - v_base), atol=1e-4)
    with pytest.raises(ValueError, match="SD1.x"):
        _auto(flux, _sd_lora(), 1.0)


def _merge(*loras, method="concat", weights=None):
    weights = weights or [1.0] * len(loras)
    kw = {}
    for i, (sd, w) in enumerate(zip(loras, weights), 1):
        kw[f"lora_{i}"], kw[f"weight_{i}"] = sd, w
    lora_1, weight_1 = kw.pop("lora_1"), kw.pop("weight_1")
    out = _node("MemoRaMultiLoRAMerge").execute(lora_1, weight_1, method, 0, 0.5, 0, "", **kw)
    return out.result if hasattr(out, "result") else out


def test_concat_merge_of_flux_loras_equals_stacking_both(flux):
    lh = _pack("_lora_host")
    a, b = _random_flux_lora(31), _random_flux_lora(32, rank=3)
    merged = _merge(a, b, weights=[1.0, 0.5])[0]
    assert FX.is_flux_lora(merged) and all(k.startswith("transformer.") for k in merged)
    stacked, _ = lh.apply_lora(lh.apply_lora(flux["model"], a)[0], b, 0.5)
    one, rep = lh.apply_lora(flux["model"], merged)
    assert len(rep.patched) == TINY_ATTENTION_WEIGHTS
    x = flux["x"]
    assert torch.allclose(_velocity(one, x, 0.6, flux["cond"]), _velocity(stacked, x, 0.6, flux["cond"]), atol=1e-5)
    # weight 1 of one LoRA is that LoRA
    alone = _merge(a)[0]
    assert torch.allclose(_velocity(lh.apply_lora(flux["model"], alone)[0], x, 0.6, flux["cond"]),
                          _velocity(lh.apply_lora(flux["model"], a)[0], x, 0.6, flux["cond"]), atol=1e-5)


def test_merging_flux_and_sd_loras_is_refused():
    with pytest.raises(ValueError, match=r"cannot merge Flux LoRAs \(lora_1\) with LoRAs for another architecture "
                                         r"\(lora_2"):
        _merge(_random_flux_lora(1), _sd_lora())


def test_a_flux_lora_on_an_sd_model_is_refused_naming_both(loaded_tiny):
    lh = _pack("_lora_host")
    with pytest.raises(ValueError) as e:
        lh.apply_lora(loaded_tiny[0], _random_flux_lora(2))
    assert "Flux (hidden size 128)" in str(e.value) and "SD1.x" in str(e.value), str(e.value)


def test_saved_file_metadata_names_the_flux_format_and_objective(trained):
    from safetensors import safe_open

    with safe_open(str(_pack("_lora_host").loras_root() / _lora_name(trained)), "pt") as f:
        meta = f.metadata()
    assert meta["memora.format"] == "diffusers-flux" and meta["memora.prediction_type"] == "flow"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["memora.layers"] == str(TINY_ATTENTION_LAYERS)
    assert meta["memora.trainable_parameters"] == str(TINY_ATTENTION_LAYERS * 4 * (128 + 128))
    assert "ss_network_module" not in meta


def test_load_and_save_lora_nodes_keep_flux_keys(comfy, flux, trained):
    """MemoRa Load LoRA on the trained file (model connected) gives the Flux LORA_MODEL back; MemoRa Save LoRA writes
    it in Flux keys that load with every key."""
    lh = _pack("_lora_host")
    out = _node("MemoRaLoadLoRA").execute(_lora_name(trained), flux["model"])
    out = out.result if hasattr(out, "result") else out
    lora = out[0]
    assert set(lora) == set(trained["out"][1])
    assert all(torch.allclose(lora[k], trained["out"][1][k]) for k in lora)
    saved = _node("MemoRaSaveLoRA").execute(lora, "memora_test/flux_resaved")
    saved = saved.result if hasattr(saved, "result") else saved
    file_sd = load_file(str(lh.loras_root() / saved[0]))
    assert set(file_sd) == set(lora)
    _model, rep = lh.apply_lora(flux["model"], file_sd)
    assert len(rep.patched) == TINY_ATTENTION_WEIGHTS and not rep.unmatched


def test_gradient_checkpointing_gives_the_same_lora(flux):
    """Flux blocks recomputed in the backward pass (and run with out-of-place adds) give the LoRA of a plain run."""
    runs = []
    for ckpt in (False, True):
        with torch.inference_mode():
            out = _node("MemoRaLoRATrain").execute(flux["model"], {"samples": flux["latents"]}, flux["cond"],
                                                   **_train_inputs(steps=2, gradient_checkpointing=ckpt, save_name=""))
        runs.append((out.result if hasattr(out, "result") else out)[1])
    assert set(runs[0]) == set(runs[1])
    assert any(float(v.abs().max()) > 0 for k, v in runs[0].items() if "lora_B" in k)
    for k in runs[0]:
        assert torch.allclose(runs[0][k], runs[1][k], atol=1e-5), k


def test_a_non_flux_flow_model_is_refused_by_training(loaded_tiny):
    """An SD UNet sampled as a discrete flow (ModelSamplingSD3-style): a flow model, but not one whose layers the
    pack can write as a Flux LoRA."""
    import comfy.model_sampling as ms

    class _Flow(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    model = loaded_tiny[0].clone()
    model.add_object_patch("model_sampling", _Flow(model.model.model_config))
    latents = {"samples": torch.randn(1, 4, 8, 8)}
    import tiny_models  # noqa: F401

    clip = loaded_tiny[1]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo"))
    with pytest.raises(ValueError, match=r"does not support this model.*implemented for Flux-family models only"):
        _node("MemoRaLoRATrain").execute(model, latents, cond, **_train_inputs(save_name=""))
