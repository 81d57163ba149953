"""MemoRa LoRA Train on the tiny SD1.x model, through ComfyUI's own executor and nodes.

What is shown: the recipe's learning-rate schedule and layer/parameter counts; the input MODEL untouched after a
training and after a cancelled one; a rerun giving a bit-identical file; the file loading in stock LoraLoader with
no warning; the same LoRA as memora's loop gives through the diffusers twin of the model (the adapter boundary);
a clear loss reduction; every bad input refused before any work with nothing written."""

from __future__ import annotations

import gc
import importlib
import json
import math
from pathlib import Path

import probes
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from graphs import Graph, run_logged, sampled_preview
from memora.lora import apply as A
from memora.lora import recipe as R
from memora.lora import train as T
from random_loras import pack_module

PROMPT = "a photo of the parachute"
TINY_ATTENTION_LAYERS = 56


def _pack(name: str, package: str = "nodes"):
    """A module of the pack as ComfyUI loaded it (its own module names, distinct from the installed ``memora``)."""
    return pack_module(f"{package}.{name}")


def _train_node():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS["MemoRaLoRATrain"]


def _loras_root() -> Path:
    return _pack("_lora_host").loras_root()


def _files(root: Path) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _train_inputs(**kw):
    args = dict(steps=4, rank=4, alpha=4.0, learning_rate=1e-3, lr_schedule="cosine", batch_size=2,
                gradient_accumulation=2, targets="attention", random_flip=True, precision="auto",
                gradient_checkpointing=False, seed=2024, save_name="memora_test/recovered")
    args.update(kw)
    return args


def _execute(model, latent, pos, **kw):
    with torch.inference_mode():
        return _train_node().execute(model, latent, pos, **_train_inputs(**kw))


def _sampled_batch_graph(tiny_ckpt, batch_size: int, steps: int):
    """(graph, checkpoint, prompt, empty latent, KSampler) nodes: the tiny model samples a batch of the prompt with
    DDIM, decoded into a PreviewImage (an output, so that the loader and sampler run before training)."""
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    pos = g.node("CLIPTextEncode", text=PROMPT, clip=ck[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=batch_size)
    ks = sampled_preview(g, ck[0], pos[0], lat[0], ck[2], seed=3, steps=steps, cfg=2.0, sampler_name="ddim",
                         scheduler="ddim_uniform")
    return g, ck, pos, lat, ks


# -- one recipe training, run twice through the executor -----------------------------------------------------------
@pytest.fixture(scope="module")
def recipe_runs(comfy, tiny_ckpt):
    """The regenerated batch of the tiny model (KSampler) -> MemoRa LoRA Train with the reference recipe except the
    number of steps and the batch layout (4 updates of 2 x 2 samples), run twice with the same seed."""
    g, ck, pos, _lat, ks = _sampled_batch_graph(tiny_ckpt, batch_size=3, steps=3)
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    model = comfy.node_outputs(ck.id)[0]
    cond = comfy.node_outputs(pos.id)[0]
    before_sample, before_weights = probes.sample_model(model, cond), probes.unet_weights(model)
    before_options = (dict(model.patches), dict(model.object_patches), model.model.manual_cast_dtype)

    runs = []
    g.node("MemoRaLoRATrain", node_id="train", model=ck[0], latents=ks[0], positive=pos[0], **_train_inputs())
    for i in range(2):
        if i:
            # ComfyUI would serve the unchanged graph from its cache: forget everything and run it from scratch
            # (checkpoint reloaded, latents regenerated, LoRA retrained)
            comfy.executor.reset()
        res = comfy.run(g.prompt)
        assert res.success, res.error_message
        runs.append({"outputs": comfy.node_outputs("train"), "ui": res.ui_outputs["train"]})
    return {"graph": g, "ck": ck, "pos": pos, "ks": ks, "model": model, "cond": cond, "runs": runs,
            "latents": comfy.node_outputs(ks.id)[0]["samples"], "before_sample": before_sample,
            "before_weights": before_weights, "before_options": before_options}


def test_same_seed_gives_a_bit_identical_file(recipe_runs):
    root = _loras_root()
    names = [r["outputs"][3] for r in recipe_runs["runs"]]
    assert names[0] != names[1] and all(n.startswith("memora_test/recovered_") for n in names)
    a, b = ((root / n).read_bytes() for n in names)
    assert a == b, "same inputs and seed must give the same bytes (tensors and metadata)"
    for r in recipe_runs["runs"]:
        assert r["ui"]["memora_lora"] == [r["outputs"][3]]


def test_saved_file_metadata_records_the_recipe(recipe_runs):
    path = _loras_root() / recipe_runs["runs"][0]["outputs"][3]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["memora.recipe"])
    assert (recipe["steps"], recipe["rank"], recipe["alpha"], recipe["seed"]) == (4, 4, 4.0, 2024)
    assert (recipe["betas"], recipe["weight_decay"], recipe["adam_eps"], recipe["max_grad_norm"]) == \
        ([0.9, 0.999], 1e-2, 1e-8, 1.0)
    assert meta["memora.steps"] == "4" and meta["memora.seed"] == "2024"
    assert meta["memora.concept"] == PROMPT
    assert meta["memora.base_model_hash"].startswith("sha256:") and len(meta["memora.base_model_hash"]) == 71
    assert meta["memora.pack_version"] and meta["memora.prediction_type"] == "epsilon"
    assert meta["memora.precision"] == "fp32" and meta["memora.layers"] == str(TINY_ATTENTION_LAYERS)
    assert json.loads(meta["memora.training_latents"])["shape"] == [3, 4, 8, 8]


def test_lr_follows_the_cosine_formula_and_loss_map_fits_core_loss_graph(recipe_runs):
    out = recipe_runs["runs"][0]["outputs"]
    loss_map = out[2]
    assert len(loss_map["loss"]) == 4 and all(math.isfinite(v) for v in loss_map["loss"])
    for k, lr in enumerate(loss_map["lr"]):
        assert lr == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)), rel=1e-12)
    ui = recipe_runs["runs"][0]["ui"]["memora_loss"]
    assert [e["step"] for e in ui] == [1, 2, 3, 4] and [e["loss"] for e in ui] == loss_map["loss"]


def test_core_plot_loss_graph_accepts_the_loss_output(comfy, recipe_runs):
    g = recipe_runs["graph"]  # its training node is cached: not trained again
    g.node("LossGraphNode", node_id="plot", loss=["train", 2], filename_prefix="memora_test_loss")
    try:
        res = comfy.run(g.prompt)
    finally:
        del g.prompt["plot"]
    assert res.success, res.error_message
    assert "plot" in res.ui_outputs


def test_concept_is_recorded_when_the_prompt_comes_from_a_string_node(comfy, tiny_ckpt):
    """The shipped workflows type the concept into a "Concept prompt" string node wired into CLIPTextEncode (here
    also through a conditioning node): the file still records it, as memora.concept and modelspec.trigger_phrase's
    source, and in the current metadata dialect."""
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    text = g.node("PrimitiveStringMultiline", value="a photo of the wired parachute")
    pos = g.node("CLIPTextEncode", text=text[0], clip=ck[1])
    timed = g.node("ConditioningSetTimestepRange", conditioning=pos[0], start=0.0, end=1.0)
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    g.node("MemoRaLoRATrain", node_id="train", model=ck[0], latents=lat[0], positive=timed[0],
           **_train_inputs(steps=1, batch_size=1, gradient_accumulation=1, save_name="memora_test/wired"))
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    with safe_open(str(_loras_root() / comfy.node_outputs("train")[3]), "pt") as f:
        meta = f.metadata()
    assert meta["memora.concept"] == "a photo of the wired parachute"
    assert meta["memora.format"] == "kohya" and meta["memora.layers"] == str(TINY_ATTENTION_LAYERS)
    assert not any(k.startswith("memora_") for k in meta), "the old metadata dialect must not be written"


def test_layer_and_parameter_counts_match_the_recipe(recipe_runs):
    lora = recipe_runs["runs"][0]["outputs"][1]
    model = recipe_runs["model"]
    downs = {k for k in lora if k.endswith(".lora_down.weight")}
    assert len(downs) == TINY_ATTENTION_LAYERS and len(lora) == 3 * TINY_ATTENTION_LAYERS
    assert all(k.startswith("lora_unet_") and "_attn" in k for k in downs)
    shapes = _pack("_train_model").target_layers(model, "attention")
    assert len(shapes) == TINY_ATTENTION_LAYERS
    n_params = sum(v.numel() for k, v in lora.items() if not k.endswith(".alpha"))
    assert n_params == R.lora_parameter_count(shapes.values(), 4)
    assert all(float(v) == 4.0 for k, v in lora.items() if k.endswith(".alpha"))
    print(f"tiny model: {len(downs)} attention layers, {n_params} LoRA parameters at rank 4 "
          f"(SD1.x: 128 layers, {R.lora_parameter_count(_sd1_attention_shapes(), 4)} parameters)")


def _sd1_attention_shapes():
    shapes = []
    for c in [320] * 5 + [640] * 5 + [1280] * 6:
        shapes += [(c, c)] * 4 + [(c, c), (c, 768), (c, 768), (c, c)]
    return shapes


def test_input_model_is_bit_identical_after_training(recipe_runs):
    model = recipe_runs["model"]
    assert torch.equal(probes.sample_model(model, recipe_runs["cond"]), recipe_runs["before_sample"])
    after = probes.unet_weights(model)
    assert all(torch.equal(after[k], v) for k, v in recipe_runs["before_weights"].items())
    assert (dict(model.patches), dict(model.object_patches), model.model.manual_cast_dtype) == \
        recipe_runs["before_options"]
    assert not model.weight_wrapper_patches
    # the trained model differs (the LoRA is applied to a clone)
    trained = recipe_runs["runs"][0]["outputs"][0]
    assert trained is not model and len(trained.patches) == TINY_ATTENTION_LAYERS
    assert not torch.equal(probes.sample_model(trained, recipe_runs["cond"]), recipe_runs["before_sample"])


def test_saved_file_loads_in_stock_lora_loader_without_warnings(comfy, recipe_runs):
    name = recipe_runs["runs"][0]["outputs"][3]
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name="memora_tiny.safetensors")
    lo = g.node("LoraLoaderModelOnly", model=ck[0], lora_name=name, strength_model=1.0)
    pos = g.node("CLIPTextEncode", text=PROMPT, clip=ck[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = sampled_preview(g, lo[0], pos[0], lat[0], ck[2], seed=7, steps=3, cfg=2.0, sampler_name="ddim",
                         scheduler="ddim_uniform")
    res, messages = run_logged(comfy, g.prompt)
    assert res.success, res.error_message
    assert not [m for m in messages if "lora key not loaded" in m], messages
    loaded = comfy.node_outputs(lo.id)[0]
    assert len(loaded.patches) == TINY_ATTENTION_LAYERS
    # the stock LoraLoader graph samples as the node's own model output does
    trained = recipe_runs["runs"][0]["outputs"][0]
    a, b = comfy.node_outputs(ks.id)[0]["samples"], probes.sample_model(trained, recipe_runs["cond"])
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    assert not torch.allclose(a, recipe_runs["before_sample"], atol=1e-3)  # and the LoRA does change it
    file_sd = load_file(str(_loras_root() / name))
    assert set(file_sd) == set(recipe_runs["runs"][0]["outputs"][1])


def test_same_lora_as_memora_loop_on_the_diffusers_twin(recipe_runs, tiny_ckpt_path):
    """The ComfyUI adapter (VE coordinates, denoised output, weight wrappers) and a plain diffusers UNet with
    attach_lora give the same training: same losses, same LoRA (fp32, within float rounding)."""
    import tiny_models

    tm, lh = _pack("_train_model"), _pack("_lora_host")
    model = recipe_runs["model"]
    recipe = R.LoRARecipe(steps=4, learning_rate=1e-3, batch_size=2, gradient_accumulation=2)
    with torch.inference_mode(False), torch.enable_grad():
        unet = tiny_models.diffusers_unet_from_checkpoint(tiny_ckpt_path).requires_grad_(False)
        gen = torch.Generator().manual_seed(recipe.seed)
        layers = T.create_lora_layers(tm.target_layers(model, "attention"), recipe, gen)
        ldm_map = lh.ldm_to_diffusers_map(model)
        by_diffusers = {ldm_map[k[len("diffusion_model."):]]: v for k, v in layers.items()}
        context = recipe_runs["cond"][0][0].detach().clone()

        def predict(x, t, c):
            return unet(x, t, encoder_hidden_states=c.expand(x.shape[0], -1, -1)).sample

        latents = recipe_runs["latents"].detach().clone() * 0.18215
        with T.attach_lora(unet, by_diffusers):
            res = T.train_lora(predict, latents, by_diffusers, recipe, tm.diffusion_schedule(model), gen, cond=context)
    comfy_out = recipe_runs["runs"][0]["outputs"]
    print("losses ComfyUI:", [round(v, 6) for v in comfy_out[2]["loss"]], "diffusers:", [round(v, 6) for v in res.losses])
    assert comfy_out[2]["loss"] == pytest.approx(res.losses, rel=1e-4)
    ref = lh.layers_to_kohya(model, layers)
    assert set(ref) == set(comfy_out[1])
    worst = max(float((ref[k] - comfy_out[1][k]).abs().max()) for k in ref)
    assert worst < 1e-5, worst


# -- loss reduction ------------------------------------------------------------------------------------------------
def test_training_reduces_the_loss_on_the_training_latents(loaded_tiny):
    """The tiny random UNet learns slowly through attention-only LoRAs, so this uses every Linear and Conv layer
    and a higher learning rate to show a clear margin in a few seconds; the figures are printed."""
    model, clip, _ = loaded_tiny
    th = _pack("_train_host")
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(2, 4, 8, 8, generator=g) / 0.18215  # unit variance in the model's latent space
    latent = {"samples": samples}
    before = th.recipe_loss(model, pos, samples, repeats=8)
    out = _execute(model, latent, pos, steps=20, targets="all linear+conv", learning_rate=1e-2,
                   lr_schedule="constant", batch_size=2, gradient_accumulation=1, random_flip=False, save_name="")
    after = th.recipe_loss(out[0], pos, samples, repeats=8)
    again = th.recipe_loss(model, pos, samples, repeats=8)
    print(f"epsilon loss on the training latents (fixed draws, 16 samples): untrained {before:.4f} -> trained "
          f"{after:.4f} (ratio {after / before:.3f}); update losses {out[2]['loss'][0]:.4f} ... {out[2]['loss'][-1]:.4f}")
    assert again == before  # the input model is unchanged
    assert after < 0.9 * before
    assert out[3] == ""  # save_name empty: nothing saved


def test_gradient_checkpointing_and_bf16(loaded_tiny):
    model, clip, _ = loaded_tiny
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) / 0.18215}
    cast = model.model.manual_cast_dtype
    plain = _execute(model, latent, pos, steps=2, save_name="")
    ckpt = _execute(model, latent, pos, steps=2, save_name="", gradient_checkpointing=True)
    for k in plain[1]:
        assert torch.allclose(plain[1][k], ckpt[1][k], atol=1e-6), k
    assert plain[2]["loss"] == pytest.approx(ckpt[2]["loss"], rel=1e-6)
    half = _execute(model, latent, pos, steps=1, save_name="", precision="bf16")
    assert all(math.isfinite(v) for v in half[2]["loss"])
    assert all(v.dtype == torch.float32 for v in half[1].values())
    assert half[2]["loss"][0] == pytest.approx(plain[2]["loss"][0], rel=0.05)  # same draws, coarser arithmetic
    fp16 = _execute(model, latent, pos, steps=1, save_name="", precision="fp16")  # with dynamic loss scaling
    assert fp16[2]["loss"][0] == pytest.approx(plain[2]["loss"][0], rel=0.01)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in fp16[1].values())
    assert model.model.manual_cast_dtype == cast and not model.object_patches


# -- cancel --------------------------------------------------------------------------------------------------------
def test_cancel_stops_within_one_step_writes_nothing_and_leaves_the_model(comfy, tiny_ckpt):
    mm = importlib.import_module("comfy.model_management")
    comfy_utils = importlib.import_module("comfy.utils")

    root = _loras_root()
    g, ck, pos, lat, ks = _sampled_batch_graph(tiny_ckpt, batch_size=2, steps=2)
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    model, cond = comfy.node_outputs(ck.id)[0], comfy.node_outputs(pos.id)[0]
    before = probes.sample_model(model, cond)
    files = _files(root)
    g.node("MemoRaLoRATrain", node_id="cancelled", model=ck[0], latents=lat[0], positive=pos[0],
           **_train_inputs(steps=50, save_name="memora_test/cancelled"))
    seen = []

    def hook(value, total, preview, node_id=None, **kw):
        if node_id == "cancelled":
            seen.append(value)
            if value >= 1:
                mm.interrupt_current_processing(True)  # what the queue's Cancel does

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        res = comfy.run(g.prompt)
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert not res.success and res.error and res.error["event"] == "execution_interrupted", res.error
    assert seen and max(seen) == 1, f"training went on after the cancel: progress {seen}"
    assert _files(root) == files, "a cancelled training must not write a file"
    # memory freed: no training wrapper left on the shared UNet, no LoRA parameter alive anywhere
    th = _pack("_train_host")
    leftover = [m for m in model.model.diffusion_model.modules()
                if any(isinstance(f, (A.LoraWeightWrapper, th.FreshCopyWrapper))
                       for f in getattr(m, "weight_function", []) + getattr(m, "bias_function", []))]
    assert not leftover, "training wrappers left on the shared model"
    assert not any(lm.model is not None and lm.model.weight_wrapper_patches for lm in mm.current_loaded_models)
    gc.collect()
    layer_class = _pack("lora.train", "memora").LoRALayerParams
    alive = [o for o in gc.get_objects() if type(o) is layer_class]
    assert not alive, f"{len(alive)} LoRA layers still referenced after the cancel"
    # and the input model samples exactly as before
    assert torch.equal(probes.sample_model(model, cond), before)
    assert not model.object_patches and not model.weight_wrapper_patches


# -- bad inputs ----------------------------------------------------------------------------------------------------
@pytest.fixture
def bad_input_env(loaded_tiny):
    model, clip, _ = loaded_tiny
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    root = _loras_root()
    root.mkdir(parents=True, exist_ok=True)
    return model, pos, root, _files(root)


@pytest.mark.parametrize("samples, kw, message", [
    (torch.zeros(0, 4, 8, 8), {}, "empty"),
    (torch.full((2, 4, 8, 8), float("nan")), {}, "non-finite"),
    (torch.tensor([[[[float("inf")]]]]).expand(1, 4, 8, 8).clone(), {}, "non-finite"),
    (torch.zeros(2, 16, 8, 8), {}, "16 channels"),
    (torch.zeros(2, 4, 8, 8), {"rank": 0}, "rank"),
    (torch.zeros(2, 4, 8, 8), {"rank": -1}, "rank"),
    (torch.zeros(2, 4, 8, 8), {"steps": 0}, "steps"),
    (torch.zeros(2, 4, 8, 8), {"save_name": "../x"}, "save_name"),
    (torch.zeros(2, 4, 8, 8), {"save_name": "memora/../../x"}, "save_name"),
    (torch.zeros(2, 4, 8, 8), {"save_name": "/tmp/x"}, "absolute"),
    (torch.zeros(2, 4, 8, 8), {"precision": "fp8"}, "precision"),
    (torch.zeros(2, 4, 8, 8), {"targets": "everything"}, "targets"),
])
def test_bad_inputs_are_refused_before_any_work(bad_input_env, samples, kw, message):
    import comfy.utils

    model, pos, root, files = bad_input_env
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda *a, **k: calls.append(a))
    try:
        with pytest.raises(ValueError, match=message):
            _execute(model, {"samples": samples}, pos, **kw)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert not calls, "training started before the input was checked"
    assert _files(root) == files


def test_unwritable_folder_is_refused_before_any_work(bad_input_env):
    model, pos, root, files = bad_input_env
    blocker = root / "memora_test_blocker"
    blocker.write_bytes(b"a file where a folder would be needed")
    try:
        with pytest.raises(ValueError, match="memora_test_blocker"):
            _execute(model, {"samples": torch.zeros(2, 4, 8, 8)}, pos, save_name="memora_test_blocker/x")
        assert _files(root) == files | {"memora_test_blocker"}
    finally:
        blocker.unlink()


def test_bad_inputs_through_the_executor(comfy, tiny_ckpt):
    from memora_batch.embedded import GraphValidationError

    root = _loras_root()
    files = _files(root)
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    pos = g.node("CLIPTextEncode", text=PROMPT, clip=ck[1])
    sd3 = g.node("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    g.node("MemoRaLoRATrain", node_id="wrong_channels", model=ck[0], latents=sd3[0], positive=pos[0],
           **_train_inputs())
    res = comfy.run(g.prompt)
    assert not res.success and "16 channels" in res.error_message and "4-channel" in res.error_message
    del g.prompt["wrong_channels"]
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    g.node("MemoRaLoRATrain", node_id="escape", model=ck[0], latents=lat[0], positive=pos[0],
           **_train_inputs(save_name="../outside"))
    res = comfy.run(g.prompt)
    assert not res.success and "save_name" in res.error_message
    del g.prompt["escape"]
    g.node("MemoRaLoRATrain", node_id="rank0", model=ck[0], latents=lat[0], positive=pos[0], **_train_inputs(rank=0))
    with pytest.raises(GraphValidationError, match="rank"):
        comfy.run(g.prompt)
    assert _files(root) == files


def test_unapplied_lora_layers_are_refused_with_the_reason():
    """ComfyUI 0.33's dynamic VRAM loading skips weight wrappers on small layers (GPU only): a LoRA layer whose
    wrapper never ran must stop training with an explanation, not train silently."""
    g = torch.Generator().manual_seed(0)
    counter = A.CallCounter()
    wrappers = {f"diffusion_model.l{i}": A.LoraWeightWrapper(f"diffusion_model.l{i}",
                                                             T.LoRALayerParams((4, 4), 2, 2.0, generator=g), counter)
                for i in range(3)}
    for w in wrappers.values():
        w(torch.zeros(4, 4))
    counter.check(None, "MemoRa LoRA Train")
    A.LoraWeightWrapper("diffusion_model.l9", T.LoRALayerParams((4, 4), 2, 2.0, generator=g), counter)
    with pytest.raises(A.LoraNotAppliedError, match="1 of 4 LoRA layers.*--disable-dynamic-vram"):
        counter.check(None, "MemoRa LoRA Train")


def test_a_batch_of_prompts_is_refused(bad_input_env):
    model, pos, root, files = bad_input_env
    two = [[torch.cat([pos[0][0], pos[0][0]]), dict(pos[0][1])]]
    with pytest.raises(ValueError, match="batch of 2 prompts"):
        _execute(model, {"samples": torch.zeros(2, 4, 8, 8)}, two, save_name="")


# -- front-end events ----------------------------------------------------------------------------------------------
def test_train_and_saved_events(loaded_tiny):
    import server

    model, clip, _ = loaded_tiny
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))

    class _Stub:
        client_id = None
        last_node_id = "42"

        def __init__(self):
            self.events = []

        def send_sync(self, event, data, sid=None):
            self.events.append((event, data))

    stub = _Stub()
    had = "instance" in server.PromptServer.__dict__
    old = server.PromptServer.__dict__.get("instance")
    server.PromptServer.instance = stub
    try:
        out = _execute(model, {"samples": torch.randn(1, 4, 8, 8) / 0.18215}, pos, steps=2, batch_size=1,
                       gradient_accumulation=1, save_name="memora_test/events")
    finally:
        if had:
            server.PromptServer.instance = old
        else:
            del server.PromptServer.instance
    train = [d for e, d in stub.events if e == "memora.train"]
    assert [d["step"] for d in train] == [1, 2] and all(d["total"] == 2 for d in train)
    assert all({"node", "loss", "lr", "elapsed", "eta"} <= set(d) for d in train)
    assert [d["loss"] for d in train] == out[2]["loss"]
    saved = [d for e, d in stub.events if e == "memora.lora_saved"]
    assert saved == [{"node": "42", "filename": out[3]}]
    (_loras_root() / out[3]).unlink()
