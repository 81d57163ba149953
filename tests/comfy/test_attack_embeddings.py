"""The embedding attacks (MemoRa Textual Inversion, MemoRa Adversarial Prompt) through ComfyUI's executor on the
micro world: each does what its paper says where the answer is known, its outputs load back through stock nodes,
the models it attacked are untouched, its cost is counted, and bad inputs get specific errors."""

from __future__ import annotations

import importlib

import pytest
import torch

from graphs import Graph

UNLEARNED = "unlearned"  # becomes "esd_x" with micro world v2
CONCEPT_PROMPT = "a photo of a star"
SIZE = 64               # Empty Latent Image size of the micro world (8 x 8 latents, 32 px images)
N_CONCEPT = 8           # the attacker's concept images
TI_STEPS = 60
TI_LR = 5e-3
AP_STEPS = 30
COST_COLUMNS = ["attack", "knowledge", "forward_calls", "backward_calls", "concept_images", "seconds"]


def _pack(name: str):
    import nodes

    root = nodes.NODE_CLASS_MAPPINGS["MemoRaTextualInversion"].__module__.rsplit(".", 2)[0]
    return importlib.import_module(f"{root}.{name}")


def _weights(variant: str) -> dict:
    from safetensors.torch import load_file

    from memora.micro import world

    return load_file(str(world.weight_path(variant)))


def _untouched(model, clip, variant: str) -> None:
    """The MODEL and CLIP a loader gave still hold the shipped weights, and no wrapper the attack installed is left
    on their layers."""
    unet = _weights(variant)
    sd = model.model.diffusion_model.state_dict()
    assert len(sd) == len(unet)
    for k, v in unet.items():
        key = k[len("model.diffusion_model."):] if k.startswith("model.diffusion_model.") else k
        assert torch.equal(sd[key].cpu(), v), f"UNet weight {key} changed"
    text = _weights("clip")
    csd = clip.cond_stage_model.state_dict()
    compared = 0
    for k, v in text.items():
        rest = k[len("cond_stage_model.transformer."):]
        for key in (f"clip_l.transformer.text_model.{rest}", f"clip_l.transformer.{rest}"):
            if key in csd:
                # ComfyUI may keep the text encoder in another dtype than the file's (fp16 on 0.33's CPU path):
                # the weight must be the file's, cast exactly as loading casts it
                assert torch.equal(csd[key].cpu(), v.to(csd[key].dtype)), f"CLIP weight {key} changed"
                compared += 1
    assert compared == len(text), (compared, len(text))
    for root in (model.model.diffusion_model, clip.cond_stage_model):
        for m in root.modules():
            assert not m.__dict__.get("weight_function") and not m.__dict__.get("bias_function")
            assert not m._forward_pre_hooks, "a forward pre-hook was left on the text encoder"


def _concept_latents(g: Graph, original):
    """The attacker's concept images: the original model's drawings of the concept (their VAE latents)."""
    pos = g.node("CLIPTextEncode", text=CONCEPT_PROMPT, clip=original[1])
    neg = g.node("CLIPTextEncode", text="", clip=original[1])
    lat = g.node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=N_CONCEPT)
    return g.node("KSampler", model=original[0], positive=pos[0], negative=neg[0], latent_image=lat[0], seed=7,
                  steps=20, cfg=7.5, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)


def _cost(res, node, display: str) -> dict:
    table = next(t for t in res.ui_outputs[node.id]["memora_scores"] if t["title"] == f"{display}: cost")
    assert table["columns"] == COST_COLUMNS and len(table["rows"]) == 1
    return dict(zip(table["columns"], table["rows"][0]))


def _recipe_loss(model, positive, samples) -> float:
    """The model's denoising loss on the samples with the nodes' fixed draws (seed 0)."""
    with torch.inference_mode():
        return _pack("nodes._train_host").recipe_loss(model, positive, samples, seed=0)


def test_textual_inversion_on_the_unlearned_model(comfy):
    """Learnt on the original's star images with the unlearned model frozen: the new token brings the unlearned
    model's denoising loss on those images clearly below the plain concept prompt's (the erasure cut the word, the
    token finds another way in), and below what the same attack reaches on the never-learned model; the saved file loads back through stock CLIP Text Encode with embedding:<name>
    and gives the same conditioning; the cost is counted; the attacked model and CLIP are untouched."""
    import folder_paths
    from safetensors import safe_open

    g = Graph()
    original = g.node("MemoRaLoadMicroWorld", variant="original")
    unlearned = g.node("MemoRaLoadMicroWorld", variant=UNLEARNED)
    concept = _concept_latents(g, original)
    ti = g.node("MemoRaTextualInversion", model=unlearned[0], clip=unlearned[1], latents=concept[0],
                token="<memora-concept>", init_word="photo", template="a photo of a {}", num_vectors=1,
                steps=TI_STEPS, learning_rate=TI_LR, batch_size=4, seed=0, save_name="memora_test/ti")
    stock = g.node("CLIPTextEncode", text=ti[1], clip=unlearned[1])
    plain = g.node("CLIPTextEncode", text=CONCEPT_PROMPT, clip=unlearned[1])
    for sink in (stock, plain):  # the executor runs only what an output node needs
        g.node("PreviewAny", source=sink[0])
    # the control: the same attack on the model that never saw a star
    never = g.node("MemoRaLoadMicroWorld", variant="never_learned")
    ti_never = g.node("MemoRaTextualInversion", model=never[0], clip=never[1], latents=concept[0],
                      token="<memora-concept>", init_word="photo", template="a photo of a {}", num_vectors=1,
                      steps=TI_STEPS, learning_rate=TI_LR, batch_size=4, seed=0, save_name="")
    g.node("PreviewAny", source=ti_never[1])
    res = comfy.run(g.prompt)
    assert res.success, res.error_message

    positive, prompt, filename = comfy.node_outputs(ti.id)
    assert filename.startswith("memora_test/ti_") and filename.endswith("_.safetensors"), filename
    assert prompt == f"a photo of a embedding:{filename[:-len('.safetensors')]}"
    path = folder_paths.get_full_path("embeddings", filename)
    with safe_open(path, "pt") as f:
        assert list(f.keys()) == ["clip_l"] and f.get_tensor("clip_l").shape == (1, 64)
        assert f.metadata()["memora.token"] == "<memora-concept>"
    # the file through stock CLIP Text Encode gives the node's conditioning (it is the same token list)
    torch.testing.assert_close(comfy.node_outputs(stock.id)[0][0][0], positive[0][0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(positive[0][0], comfy.node_outputs(plain.id)[0][0][0])

    model, clip = comfy.node_outputs(unlearned.id)[:2]
    samples = comfy.node_outputs(concept.id)[0]["samples"]
    loss_plain = _recipe_loss(model, comfy.node_outputs(plain.id)[0], samples)
    loss_ti = _recipe_loss(model, positive, samples)
    table = next(t for t in res.ui_outputs[ti.id]["memora_scores"] if t["title"].endswith(": loss"))
    loss_init, loss_learnt, steps = table["rows"][0]
    print(f"textual inversion: loss plain prompt {loss_plain:.4f}, init word {loss_init:.4f}, learnt token "
          f"{loss_ti:.4f}")
    assert loss_learnt == pytest.approx(loss_ti, rel=1e-4) and steps == TI_STEPS
    # measured (4 fixed draws per image): plain 0.165, init word 0.190, learnt 0.146
    assert loss_ti < 0.95 * loss_plain
    assert loss_ti < 0.95 * loss_init

    # the unlearned model still holds more of the star than the never-learned one: with its best word it denoises
    # the star images clearly better (measured 0.146 vs 0.172)
    never_table = next(t for t in res.ui_outputs[ti_never.id]["memora_scores"] if t["title"].endswith(": loss"))
    print(f"textual inversion on the never-learned model: learnt token {never_table['rows'][0][1]:.4f}")
    assert loss_learnt < 0.95 * never_table["rows"][0][1]
    assert comfy.node_outputs(ti_never.id)[2] == ""  # not saved

    cost = _cost(res, ti, "MemoRa Textual Inversion")
    assert cost["attack"] == "textual inversion" and cost["knowledge"] == "weights+gradients"
    assert cost["forward_calls"] == TI_STEPS and cost["backward_calls"] == TI_STEPS
    assert cost["concept_images"] == N_CONCEPT and cost["seconds"] > 0
    _untouched(model, clip, UNLEARNED)


def test_adversarial_prompt_lowers_the_denoising_loss(comfy):
    """UnlearnDiffAtk's objective on the unlearned model: the discrete prefix (a text prompt, which stock CLIP
    Text Encode turns into the node's conditioning) and the continuous variant both lower the model's denoising
    loss on the star images below the plain prompt's, with the same fixed draws; model and CLIP untouched."""
    g = Graph()
    original = g.node("MemoRaLoadMicroWorld", variant="original")
    unlearned = g.node("MemoRaLoadMicroWorld", variant=UNLEARNED)
    concept = _concept_latents(g, original)
    nodes = {mode: g.node("MemoRaAdversarialPrompt", model=unlearned[0], clip=unlearned[1], latents=concept[0],
                          prompt=CONCEPT_PROMPT, num_tokens=5, steps=AP_STEPS, mode=mode, learning_rate=1e-2,
                          seed=0) for mode in ("discrete", "continuous")}
    stock = g.node("CLIPTextEncode", text=nodes["discrete"][1], clip=unlearned[1])
    g.node("PreviewAny", source=stock[0])
    g.node("PreviewAny", source=nodes["continuous"][1])
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    for mode, node in nodes.items():
        table = next(t for t in res.ui_outputs[node.id]["memora_scores"] if t["title"].endswith(": loss"))
        loss_plain, loss_adv, got_mode = table["rows"][0]
        print(f"adversarial prompt ({mode}): loss {loss_plain:.4f} -> {loss_adv:.4f}; "
              f"{comfy.node_outputs(node.id)[1]!r}")
        assert got_mode == mode
        # measured (30 steps): discrete 0.165 -> 0.146, continuous 0.165 -> 0.123
        assert loss_adv < 0.97 * loss_plain, (mode, loss_plain, loss_adv)
        cost = _cost(res, node, "MemoRa Adversarial Prompt")
        assert cost["attack"] == f"adversarial prompt ({mode})" and cost["knowledge"] == "weights+gradients"
        assert cost["forward_calls"] == AP_STEPS and cost["backward_calls"] == AP_STEPS
        assert cost["concept_images"] == N_CONCEPT
    positive, text = comfy.node_outputs(nodes["discrete"].id)
    prefix = text[:-len(CONCEPT_PROMPT)].split()
    assert text.endswith(" " + CONCEPT_PROMPT) and len(prefix) == 5 and all(w.isalpha() for w in prefix), text
    torch.testing.assert_close(comfy.node_outputs(stock.id)[0][0][0], positive[0][0], atol=1e-5, rtol=1e-5)
    model, clip = comfy.node_outputs(unlearned.id)[:2]
    _untouched(model, clip, UNLEARNED)


def _refused(comfy, node_type: str, width: int = SIZE, **inputs) -> str:
    g = Graph()
    world = g.node("MemoRaLoadMicroWorld", variant="original")
    lat = g.node("EmptyLatentImage", width=width, height=width, batch_size=2)
    common = dict(model=world[0], clip=world[1], latents=lat[0], steps=2, learning_rate=1e-3, seed=0)
    if node_type == "MemoRaTextualInversion":
        common.update(token="<memora-concept>", init_word="photo", template="a photo of {}", num_vectors=1,
                      batch_size=2, save_name="")
    else:
        common.update(prompt=CONCEPT_PROMPT, num_tokens=2, mode="discrete")
    node = g.node(node_type, **{**common, **inputs})
    g.node("PreviewAny", source=node[1])
    res = comfy.run(g.prompt)
    assert not res.success, f"{node_type} {inputs} was not refused"
    return res.error_message


@pytest.mark.parametrize("node_type", ["MemoRaTextualInversion", "MemoRaAdversarialPrompt"])
def test_bad_inputs_are_refused(comfy, node_type):
    import folder_paths

    before = sorted(p.name for p in __import__("pathlib").Path(folder_paths.get_folder_paths("embeddings")[0])
                    .rglob("*") if p.is_file())
    msg = _refused(comfy, node_type, steps=0)
    assert "steps is 0" in msg and "at least 1 optimisation step" in msg, msg
    # 56 px -> 7 x 7 latents: the micro UNet halves the resolution once
    msg = _refused(comfy, node_type, width=56)
    assert "latents are 7 x 7" in msg and "multiples of 2" in msg, msg
    if node_type == "MemoRaTextualInversion":
        msg = _refused(comfy, node_type, token="star")
        assert "token 'star' already exists in the tokenizer's vocabulary" in msg, msg
        msg = _refused(comfy, node_type, template="a photo")
        assert "exactly one '{}'" in msg, msg
        msg = _refused(comfy, node_type, save_name="../outside")
        assert "outside" in msg, msg
    after = sorted(p.name for p in __import__("pathlib").Path(folder_paths.get_folder_paths("embeddings")[0])
                   .rglob("*") if p.is_file())
    assert after == before, "a refused attack wrote a file"
