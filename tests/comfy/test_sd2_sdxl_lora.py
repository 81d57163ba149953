"""MemoRa LoRA Train and LoRA files on SD2.x (v-prediction) and SDXL, through ComfyUI's own executor and nodes, on
the tiny SD2-v and SDXL checkpoints (tests/support/tiny_models.py) that ComfyUI's model detection loads as those
architectures.

What is shown, per architecture: the recipe's layer and parameter counts (the real SD2 / SDXL counts from the
published UNet configurations built on the meta device; the tiny models' through the node, against their diffusers
twins); the input MODEL bit-identical after training and the LoRA changing the output; the loss target (v for SD2-v);
the file in the names kohya sd-scripts writes, loading in stock LoraLoader with no key dropped (ComfyUI's log
captured) and in diffusers' own pipeline with no key unexpected and the same weights; MemoRa Load LoRA reading the
same LoRA as a diffusers (PEFT) and an old-diffusers file; SDXL's size conditioning taken from the CONDITIONING as the
sampler takes it; an SD1.x LoRA on SDXL and the reverse refused naming both architectures, nothing modified."""

from __future__ import annotations

import re
import logging
import logging.handlers
from pathlib import Path

import probes
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import random_loras
from graphs import Graph
from memora.lora import formats
from memora.lora import recipe as R
from memora.lora import train as T

PROMPT = "a photo of the parachute"
ARCHS = ("sd2", "sdxl")

# The real architectures' counts at rank 4 (attention targets), from the published diffusers UNet configurations
# (test_real_counts computes them); SD1.x's 128 / 797,184 are in test_lora_train.py.
REAL_COUNTS = {"sd15": (128, 797_184), "sd2": (128, 829_952), "sdxl": (560, 5_806_080)}
# the tiny stand-ins: SD2 has the tiny SD1.x layout (56 layers); SDXL no attention at level 0, 2 blocks each (64)
TINY_LAYERS = {"sd2": 56, "sdxl": 64}


def _host(name="_lora_host"):
    return random_loras.pack_module(f"nodes.{name}")


def _ckpt(arch, request) -> str:
    return request.getfixturevalue({"sd2": "tiny_sd2v_ckpt", "sdxl": "tiny_sdxl_ckpt"}[arch])


def _attention_shapes(module) -> list[tuple]:
    return list(T.find_target_layers(module, R.ATTENTION).values())


def _train_inputs(**kw):
    args = dict(steps=3, rank=4, alpha=4.0, learning_rate=1e-2, lr_schedule="cosine", batch_size=2,
                gradient_accumulation=1, targets="attention", random_flip=True, precision="auto",
                gradient_checkpointing=False, seed=2024, save_name="memora_test/arch")
    args.update(kw)
    return args


def _capture(logger_names=("",)):
    """A handler on these loggers that keeps every record (``messages``): diffusers' loggers do not propagate."""
    handler = logging.handlers.BufferingHandler(capacity=10 ** 6)
    for n in logger_names:
        logging.getLogger(n).addHandler(handler)
    return handler


def _messages(handler) -> list[str]:
    return [r.getMessage() for r in handler.buffer]


def _release(handler, logger_names=("",)):
    for n in logger_names:
        logging.getLogger(n).removeHandler(handler)


# -- one training per architecture, through the executor ------------------------------------------------------------
@pytest.fixture(scope="module", params=ARCHS)
def trained(request, comfy, comfy_base):
    """The tiny model samples 2 latents (KSampler) -> MemoRa LoRA Train (3 updates of 2), through the executor."""
    arch = request.param
    ckpt = _ckpt(arch, request)
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    pos = g.node("CLIPTextEncode", text=PROMPT, clip=ck[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=2)
    ks = g.node("KSampler", model=ck[0], positive=pos[0], negative=pos[0], latent_image=lat[0], seed=3, steps=3,
                cfg=2.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
    g.node("PreviewAny", source=ks[0])
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    model, cond = comfy.node_outputs(ck.id)[0], comfy.node_outputs(pos.id)[0]
    before = {"sample": probes.sample_model(model, cond), "weights": probes.unet_weights(model),
              "options": (dict(model.patches), dict(model.object_patches), model.model.manual_cast_dtype)}
    g.node("MemoRaLoRATrain", node_id="train", model=ck[0], latents=ks[0], positive=pos[0],
           **_train_inputs(save_name=f"memora_test/{arch}"))
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    out = comfy.node_outputs("train")
    path = _host().loras_root() / out[3]
    return {"arch": arch, "ckpt": ckpt, "ckpt_path": comfy_base / "models" / "checkpoints" / ckpt, "model": model,
            "cond": cond, "latents": comfy.node_outputs(ks.id)[0]["samples"], "before": before, "outputs": out,
            "path": path}


def test_tiny_models_are_detected_as_their_architectures(trained):
    import comfy.model_base
    import comfy.supported_models as sm

    model = trained["model"]
    if trained["arch"] == "sd2":
        assert isinstance(model.model.model_config, sm.SD20)
        assert model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    else:
        assert isinstance(model.model.model_config, sm.SDXL) and isinstance(model.model, comfy.model_base.SDXL)
        assert model.model.model_type == comfy.model_base.ModelType.EPS


def test_real_counts():
    """SD1.x 128 / 797,184, SD2.x 128 / 829,952, SDXL 560 / 5,806,080 (rank 4, attention): the published UNet
    configurations built on the meta device, layers chosen by the recipe's own selection."""
    from diffusers import UNet2DConditionModel

    for arch, cfg in probes.REAL_UNET_CONFIGS.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**cfg)
        shapes = _attention_shapes(unet)
        assert (len(shapes), R.lora_parameter_count(shapes, 4)) == REAL_COUNTS[arch], arch


def test_tiny_counts_through_the_node(trained):
    import tiny_models

    arch = trained["arch"]
    lora = trained["outputs"][1]
    downs = {k for k in lora if k.endswith(".lora_down.weight")}
    twin = tiny_models.arch_diffusers_unet_from_checkpoint(arch, trained["ckpt_path"])
    shapes = _attention_shapes(twin)
    assert len(downs) == len(shapes) == TINY_LAYERS[arch]
    n_params = sum(v.numel() for k, v in lora.items() if not k.endswith(".alpha"))
    assert n_params == R.lora_parameter_count(shapes, 4)
    meta = safe_open(str(trained["path"]), "pt").metadata()
    assert meta["memora.trainable_parameters"] == str(n_params) and meta["memora.layers"] == str(len(shapes))
    print(f"\n{arch}: {len(shapes)} attention layers, {n_params} LoRA parameters at rank 4")


def test_model_untouched_and_lora_changes_output(trained):
    model, before = trained["model"], trained["before"]
    assert torch.equal(probes.sample_model(model, trained["cond"]), before["sample"])
    after = probes.unet_weights(model)
    assert all(torch.equal(after[k], v) for k, v in before["weights"].items())
    assert (dict(model.patches), dict(model.object_patches), model.model.manual_cast_dtype) == before["options"]
    assert not model.weight_wrapper_patches
    out_model = trained["outputs"][0]
    assert len(out_model.patches) == TINY_LAYERS[trained["arch"]]
    change = (probes.sample_model(out_model, trained["cond"]) - before["sample"]).abs().max().item()
    assert change > 1e-3, change


def test_loss_target_is_the_models_own(trained):
    """SD2-v trains on the velocity, SDXL base on epsilon (the model's own prediction type, recorded)."""
    meta = safe_open(str(trained["path"]), "pt").metadata()
    assert meta["memora.prediction_type"] == {"sd2": "v_prediction", "sdxl": "epsilon"}[trained["arch"]]
    # kohya sd-scripts' base-model tags, from ComfyUI's detected architecture and prediction type
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == \
        {"sd2": ("sd_v2_768_v", "True"), "sdxl": ("sdxl_base_v1-0", "False")}[trained["arch"]]
    losses = trained["outputs"][2]["loss"]
    assert len(losses) == 3 and all(v == v and v > 0 for v in losses)


def test_file_has_kohya_sd_scripts_names(trained):
    file_sd = load_file(str(trained["path"]))
    lora = trained["outputs"][1]
    unet = [k for k in file_sd if k.startswith("lora_unet_")]
    assert len(unet) == len(file_sd) == 3 * TINY_LAYERS[trained["arch"]]
    if trained["arch"] == "sdxl":
        # sd-scripts' SDXL UNet keeps the original module names: input_blocks / middle_block / output_blocks
        assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
                   for k in unet), unet[:3]
        assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.lora_down.weight"  # tiny: level 1 in file_sd
    else:
        assert set(file_sd) == set(lora)
        assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_"))
                   for k in unet), unet[:3]
    # same tensors under both names
    assert sorted(v.sum().item() for v in file_sd.values()) == sorted(v.sum().item() for v in lora.values())


def test_stock_loraloader_loads_every_key(comfy, trained):
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=trained["ckpt"])
    lo = g.node("LoraLoader", model=ck[0], clip=ck[1], lora_name=trained["outputs"][3], strength_model=1.0,
                strength_clip=1.0)
    g.node("PreviewAny", source=lo[0])
    handler = _capture()
    try:
        res = comfy.run(g.prompt)
    finally:
        _release(handler)
    assert res.success, res.error_message
    assert not [m for m in _messages(handler) if "lora key not loaded" in m], _messages(handler)
    loaded = comfy.node_outputs(lo.id)[0]
    assert set(loaded.patches) == set(trained["outputs"][0].patches)
    # the same patch tensors as the node's own output model
    a = trained["outputs"][0].patches
    for k, p in loaded.patches.items():
        assert torch.equal(p[0][1].weights[0], a[k][0][1].weights[0]), k


# -- diffusers ---------------------------------------------------------------------------------------------------
def _tokenizer():
    import comfy.sd1_clip
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"))


def _pipeline(arch, unet):
    """A tiny diffusers pipeline of the architecture built from components (nothing downloaded; tokenizers are
    ComfyUI's own files)."""
    import memora_testkit
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def cfg(c, **kw):
        return CLIPTextConfig(**{k: v for k, v in dict(c, **kw).items() if k not in ("architectures", "torch_dtype")})

    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    te = CLIPTextModel(cfg(memora_testkit.TINY_CLIP_CONFIG))
    if arch == "sdxl":
        te2 = CLIPTextModelWithProjection(cfg(memora_testkit.TINY_CLIP_G_CONFIG))
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=_tokenizer(),
                                         tokenizer_2=_tokenizer(), unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1))
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=_tokenizer(), unet=unet,
                                   scheduler=EulerDiscreteScheduler(prediction_type="v_prediction", steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _comfy_patched_weights(patched) -> dict[str, torch.Tensor]:
    import comfy.model_management as mm

    try:
        mm.load_models_gpu([patched])
        return {k: v.detach().clone() for k, v in patched.model.diffusion_model.state_dict().items()}
    finally:
        mm.unload_all_models()


def test_diffusers_pipeline_loads_the_file(trained):
    """StableDiffusion(XL)Pipeline.load_lora_weights reads the file with no unexpected key, puts a LoRA on every
    layer, and (fused) gives each UNet weight the value ComfyUI's LoraLoader patch gives it; the PEFT file diffusers'
    save_lora_weights writes from it reads back in MemoRa Load LoRA to the same LoRA."""
    import tiny_models

    arch = trained["arch"]
    pipe = _pipeline(arch, tiny_models.arch_diffusers_unet_from_checkpoint(arch, trained["ckpt_path"]))
    names = ("", "diffusers", "peft")
    handler = _capture(names)
    try:
        pipe.load_lora_weights(str(trained["path"]), adapter_name="memora")
    finally:
        _release(handler, names)
    # (the LoRA has no text-encoder layers: diffusers says so for each text encoder, which is no dropped key)
    bad = [m for m in _messages(handler) if "unexpected keys" in m or "missing keys" in m
           or ("No LoRA keys" in m and "CLIPTextModel" not in m)]
    assert bad == [], bad
    assert any("No LoRA keys associated to CLIPTextModel" in m for m in _messages(handler))  # the capture works
    lora_modules = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "memora" in m.lora_A]
    assert len(lora_modules) == TINY_LAYERS[arch]
    # diffusers' own writer: the PEFT file a diffusers user has for this LoRA, read back by MemoRa Load LoRA
    from peft.utils import get_peft_model_state_dict

    folder = _host().loras_root() / "memora_test"
    name = f"{arch}_written_by_diffusers.safetensors"
    type(pipe).save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="memora"),
                                 weight_name=name)
    read, fmt, _ = random_loras.pack_module("nodes.lora").load_lora_as_kohya(folder / name, trained["outputs"][0])
    assert fmt == formats.PEFT
    want = formats.kohya_layers(trained["outputs"][1])
    got = formats.kohya_layers(read)
    assert set(got) == set(want)
    assert all(torch.allclose(got[n].delta(), want[n].delta(), atol=1e-6) for n in want)
    pipe.fuse_lora(adapter_names=["memora"])
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    comfy_w = _comfy_patched_weights(trained["outputs"][0])
    ldm = tiny_models.arch_ldm_map(arch)
    changed = 0
    for key, w in fused.items():
        ref = comfy_w[ldm[key]]
        assert torch.allclose(w, ref, atol=1e-6), key
        changed += int(not torch.equal(ref, trained["before"]["weights"][ldm[key]]))
    assert changed == TINY_LAYERS[arch]


def _peft_variants(sd):
    peft = formats.kohya_to_diffusers(sd)
    old = {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
           for k, v in peft.items()}
    return {"peft": peft, "diffusers-old": old}


def test_load_node_reads_diffusers_and_peft_files_of_the_architecture(comfy, trained):
    lora = trained["outputs"][1]
    ref = {n: layer.delta() for n, layer in formats.kohya_layers(lora).items()}
    folder = _host().loras_root() / "memora_test"
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=trained["ckpt"])
    refs = {}
    for fmt, variant in _peft_variants(lora).items():
        name = random_loras.write_lora(folder, f"{trained['arch']}_{fmt}.safetensors", variant)
        refs[fmt] = g.node("MemoRaLoadLoRA", lora_name=f"memora_test/{name}", model=ck[0])
        g.node("PreviewAny", source=refs[fmt][1])
    refs["kohya-file"] = g.node("MemoRaLoadLoRA", lora_name=trained["outputs"][3], model=ck[0])
    g.node("PreviewAny", source=refs["kohya-file"][1])
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    for fmt, node in refs.items():
        got = formats.kohya_layers(comfy.node_outputs(node.id)[0])
        assert set(got) == set(ref), fmt
        for n, d in ref.items():
            assert torch.allclose(got[n].delta(), d, atol=1e-6), (fmt, n)


# -- SDXL conditioning -----------------------------------------------------------------------------------------------
def test_sdxl_size_conditioning_comes_from_the_conditioning(request, comfy):
    """The training loss uses the adm vector ComfyUI's sampler builds: the latent's size when the CONDITIONING names
    none (an explicit 64 x 64 gives the same loss), the CONDITIONING's own size and crop otherwise."""
    import nodes

    ckpt = _ckpt("sdxl", request)
    model, clip = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt)[:2]
    th = _host("_train_host")
    with torch.inference_mode():
        cond = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def with_size(**kw):
        return [[c[0], dict(c[1], **kw)] for c in cond]

    base = th.recipe_loss(model, cond, latents, batch_size=2, repeats=1)
    same = th.recipe_loss(model, with_size(width=64, height=64), latents, batch_size=2, repeats=1)
    other = th.recipe_loss(model, with_size(width=1024, height=1024, crop_w=32), latents, batch_size=2, repeats=1)
    assert base == same
    assert abs(other - base) > 1e-6 * abs(base)


def test_sdxl_conditioning_without_pooled_output_is_refused(request, comfy):
    import nodes

    ckpt = _ckpt("sdxl", request)
    model, clip = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt)[:2]
    with torch.inference_mode():
        cond = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    no_pooled = [[c[0], {k: v for k, v in c[1].items() if k != "pooled_output"}] for c in cond]
    latent = {"samples": torch.randn(2, 4, 8, 8)}
    train = nodes.NODE_CLASS_MAPPINGS["MemoRaLoRATrain"]
    root = _host().loras_root()
    files = set(root.rglob("*"))
    with pytest.raises(ValueError, match="no pooled_output.*SDXL"):
        with torch.inference_mode():
            train.execute(model, latent, no_pooled, **_train_inputs())
    # a prompt encoded by another architecture's CLIP (SD1.x: 64 wide) on SDXL (128 wide)
    sd1_cond = [[torch.zeros(1, 77, 64), {"pooled_output": cond[0][1]["pooled_output"]}]]
    with pytest.raises(ValueError, match="64-wide.*SDXL.*128-wide"):
        with torch.inference_mode():
            train.execute(model, latent, sd1_cond, **_train_inputs())
    assert set(root.rglob("*")) == files and not model.patches


# -- cross-architecture LoRAs ----------------------------------------------------------------------------------------
def test_sd1_lora_on_sdxl_and_the_reverse_are_refused_naming_both(comfy, request, loaded_tiny):
    import nodes

    sdxl_model = nodes.CheckpointLoaderSimple().load_checkpoint(_ckpt("sdxl", request))[0]
    sd1_model = loaded_tiny[0]
    sd1_lora = random_loras.random_kohya_lora(random_loras.lora_targets(sd1_model), rank=4, seed=1)
    sdxl_lora = random_loras.random_kohya_lora(random_loras.lora_targets(sdxl_model), rank=4, seed=2)
    host = _host()
    folder = host.loras_root() / "memora_test"
    files = {"sd1": random_loras.write_lora(folder, "cross_sd1.safetensors", sd1_lora),
             "sdxl": random_loras.write_lora(folder, "cross_sdxl.safetensors",
                                             host.sd_scripts_names(sdxl_model, sdxl_lora))}
    before = {id(m): (probes.unet_weights(m), dict(m.patches)) for m in (sdxl_model, sd1_model)}
    cases = [(sdxl_model, sd1_lora, "sd1", "SD1.x/SD2.x", "SDXL"), (sd1_model, sdxl_lora, "sdxl", "SDXL", "SD1.x")]
    for model, lora, file_key, lora_arch, model_arch in cases:
        with pytest.raises(host.LoraKeyError) as e:
            host.apply_lora(model, lora, 1.0)
        msg = str(e.value)
        assert f"It was made for an {lora_arch}-layout UNet" in msg and f"the base checkpoint is {model_arch}" in msg, msg
        with pytest.raises(host.LoraKeyError, match=f"made for an {re.escape(lora_arch)}-layout UNet.*the base checkpoint is {model_arch}"):
            random_loras.pack_module("nodes.lora").load_lora_as_kohya(folder / files[file_key], model)
    for m in (sdxl_model, sd1_model):
        w, p = before[id(m)]
        assert dict(m.patches) == p and all(torch.equal(probes.unet_weights(m)[k], v) for k, v in w.items())
    # and through the executor, MemoRa Load LoRA with the model connected
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=_ckpt("sdxl", request))
    ld = g.node("MemoRaLoadLoRA", lora_name=f"memora_test/{files['sd1']}", model=ck[0])
    g.node("PreviewAny", source=ld[1])
    res = comfy.run(g.prompt)
    assert not res.success and "SD1.x/SD2.x" in res.error_message and "the base checkpoint is SDXL" in res.error_message


def test_sd1_base_model_tag(loaded_tiny):
    train = random_loras.pack_module("nodes.train")
    assert train.kohya_base_model_tags(loaded_tiny[0], "epsilon") == {"ss_base_model_version": "sd_v1",
                                                                       "ss_v2": "False"}


def test_metadata_names_the_architecture_and_implementation(comfy):
    """A LoRA of the real widths: ModelSpec names SD2-768-v / SDXL base from the cross-attention width and the
    prediction type; an SGM-named (SDXL) file says Stability AI's implementation, as sd-scripts writes it."""
    train = random_loras.pack_module("nodes.train")
    th = _host("_train_host")
    cases = {"sd2": ({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 1024)}, "v_prediction",
                     "stable-diffusion-v2-768-v-lora", "diffusers", False),
             "sdxl": ({"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 2048)}, "epsilon",
                      "stable-diffusion-xl-v1-base-lora", train.SGM_IMPLEMENTATION, True)}
    for arch, (targets, prediction, spec, impl, sgm) in cases.items():
        sd = random_loras.random_kohya_lora(targets, rank=4, seed=0)
        run = th.TrainingRun(layers={}, result=T.TrainResult(losses=[0.5], lrs=[1e-4]), trainable_parameters=1,
                             dtype=torch.float32, prediction_type=prediction, base_model_hash="sha256:0")
        meta = train.lora_metadata(R.LoRARecipe(), run, "", torch.zeros(1, 4, 8, 8), sd, title="t", sgm_names=sgm)
        assert (meta["modelspec.architecture"], meta["modelspec.implementation"]) == (spec, impl), arch


def test_zero_terminal_snr_sd2v_trains_on_the_velocity(comfy, tiny_sd2v_ztsnr_ckpt):
    """The zero-terminal-SNR variant (alpha_bar[-1] ~ 5e-8, sigma_max ~ 4.5e3): the velocity the loop gets from
    ComfyUI's denoised output at the last timestep is the UNet's own v output (to fp32 precision), and training runs
    with finite losses."""
    import comfy.samplers
    import nodes

    model, clip = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sd2v_ztsnr_ckpt)[:2]
    assert bool(model.get_model_object("model_sampling").zsnr)
    with torch.inference_mode():
        cond = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    th, tm = _host("_train_host"), _host("_train_model")
    schedule = tm.diffusion_schedule(model)
    assert schedule.prediction_type == T.V_PREDICTION and float(schedule.alphas_cumprod[-1]) < 1e-6
    g = torch.Generator().manual_seed(0)
    x_vp = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([999])
    sigmas = model.get_model_object("model_sampling").sigmas.detach().float()
    got = {}

    def run(model_wrap, extra_args):
        from memora.lora import denoiser

        got["v"] = denoiser.make_predict(model_wrap, extra_args, schedule, sigmas)(x_vp, t)
        return got["v"]

    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": cond})
    guider.set_cfg(1.0)
    with torch.inference_mode():
        guider.sample(torch.zeros_like(x_vp), x_vp, th._TrainingSampler(run), sigmas[[-1, 0]].clone(), disable_pbar=True, seed=0)
        # the UNet's own output at t = 999 for the same noisy latent (ComfyUI's calculate_input of x_vp / sqrt(ab))
        direct = model.model.diffusion_model(x_vp, timesteps=t.float(), context=cond[0][0])
    assert torch.allclose(got["v"], direct, atol=1e-4 * direct.abs().max().item()), \
        float((got["v"] - direct).abs().max())
    with torch.inference_mode():
        out = nodes.NODE_CLASS_MAPPINGS["MemoRaLoRATrain"].execute(
            model, {"samples": torch.randn(2, 4, 8, 8, generator=g)}, cond, **_train_inputs(steps=2, save_name=""))
    losses = out.result[2]["loss"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
