"""Generate example_workflows/{multi_memora,automemora}.json and their thumbnails.

Same machinery as scripts/make_workflows.py (UI format written from the installed node definitions, so widget values
sit where the editor expects them; Pillow diagram thumbnails drawn from the workflow itself):

    python scripts/make_merge_workflows.py            # uses $COMFYUI_PATH or ~/comfy/ComfyUI
    python scripts/make_merge_workflows.py --check    # exit 1 if the committed files differ

Titles are addresses (memora-batch, docs/merge-and-automemora.md, the tests): keep them stable.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))
import make_workflows as mw  # noqa: E402  (layout helpers, thumbnails, node definitions, the shared stages)
from make_workflows import BLUE, COL, K, PURPLE, YELLOW, Stack, c  # noqa: E402

CONCEPTS = {"A": "a photo of the parachute", "B": "a photo of the church"}
# The reference's first seed of a pair for the first halves, second seed for the second halves (docs/method.md).
SEEDS = (1805, 2821)

README_MULTI = """Multi-MemoRa: recover SEVERAL concepts erased from one model at once (e.g. MACE with two celebrities erased).

One MemoRa LoRA per concept, each trained on its own regenerated images and caption, then merged into ONE LoRA that brings both concepts back.

LOAD
- "Original model": the model BEFORE unlearning (e.g. sd-v1-4.ckpt). It draws each concept's seed images.
- "Unlearned model" (MemoRa Load Unlearned Model): the base it was unlearned from (sd-v1-4.ckpt) + the model with the concepts erased, in any format the loader detects (full or partial UNet, text encoder, AC delta, SPM LoRA, diffusers folder, full checkpoint; docs/models.md). Both branches invert, regenerate and train on it; the merged LoRA is applied to it.
- "Concept A prompt", "Concept B prompt": the erased concepts, as captions ("a photo of <name>").

RUN (Queue). Per concept: seed images from the original model -> encode with the unlearned VAE -> DDIM inversion to step 15 of 50 -> slerp within pairs -> regeneration -> MemoRa LoRA Train (rank 4, 500 updates). Then "Merge LoRAs" (MemoRa Multi-LoRA Merge) and one sampler with the merged LoRA on the unlearned model.

OUTPUT: models/loras/memora/concept_a_*, concept_b_* and the merge memora/multi_memora_* (kohya format, metadata lists the sources and the method); images in output/memora/multi_*.

More concepts: copy one branch (keep the titles unique, e.g. "Concept C ..."), connect its "Train LoRA (concept C)" lora output to lora_3 of "Merge LoRAs" (four slots)."""

README_SEEDS = """Seed images: one KSampler per half with a batch of 3 (seeds 1805 and 2821): slerp pairs image i of the first half with image i of the second. ComfyUI draws a batch's noise from one seed, so these are not the reference's six seed pairs; for those, build each concept's seeds as memora_recovery does (one KSampler per seed)."""

README_MERGE = """Merge LoRAs (MemoRa Multi-LoRA Merge)
- method concat (default): EXACT. The merged LoRA behaves exactly like the two LoRAs stacked at their weights (ranks add up: 4 + 4 = 8).
- svd: the weighted sum of the deltas truncated to "rank"; the report gives the energy kept per layer (1 = nothing lost).
- ties / dare_linear / dare_ties / magnitude_prune: peft's merges of the delta-W tensors (density, seed), re-factorised to "rank". TIES and DARE trade exactness for less interference between the concepts.
- weight_1 / weight_2: strength of each concept (0 leaves one out).

"Apply merged LoRA" applies it to the unlearned model (core Load LoRA Model); "Evaluation prompt" is what the sampler draws: set it to either concept's prompt, or sweep both with memora-batch (docs/batch.md)."""

README_AUTO = """AutoMemoRa: guidance between the unlearned model ("bad") and the same model + its MemoRa LoRA ("main"):

  eps = eps_bad + w (eps_main - eps_bad), each side with its own classifier-free guidance (cfg).

w = 0: the unlearned model; w = 1: the LoRA model (both exactly); w > 1 pushes beyond the LoRA model, further toward the recovered concept. main = "unlearned" swaps the roles (pushes away from it).

LOAD
- "Unlearned model" (MemoRa Load Unlearned Model): the base (sd-v1-4.ckpt) + the model with the concept erased, in any format the loader detects (docs/models.md).
- "MemoRa LoRA": the LoRA recovered for it (e.g. models/loras/memora/recovered_00001_.safetensors from memora_recovery, or a merge).
- "Prompt": what to draw.

The guider keeps ONE copy of the weights (the LoRA is switched on and off between the two predictions): 2 model evaluations per step. "Unlearned (no guidance)" draws the same noise with the unlearned model alone, for comparison."""


def concept_branch(g, side, unl, orig, enc_orig, enc_unl, seed_size, x, y):
    """Seed images (original model) -> encode -> invert -> slerp -> regenerate -> Train LoRA, for one concept."""
    cols = [Stack(g, x + COL * k, y) for k in range(4)]
    pos_o, neg_o = enc_orig
    pos_u, neg_u = enc_unl
    nodes, inverted = [], {}
    for half, seed, col in (("first", SEEDS[0], cols[0]), ("second", SEEDS[1], cols[0])):
        ks = col.add("KSampler", f"Concept {side} seed images ({half} of pairs)", seed=seed, steps=50, cfg=7.5,
                     sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
        g.wire(ks, model=orig[0], positive=pos_o[0], negative=neg_o[0], latent_image=seed_size[0])
        dec = g.wire(cols[1].add("VAEDecode", f"Concept {side} seed pixels ({half})"), samples=ks[0], vae=orig[2])
        e = g.wire(cols[1].add("VAEEncode", f"Concept {side} encode ({half})"), pixels=dec[0], vae=unl[2])
        inv = cols[2].add("MemoRaDDIMInversion", f"Concept {side} invert ({half})", **c(PURPLE), steps=50,
                          start_at_step=15, cfg=7.5, refine_iterations=0, schedule="exact",
                          size=(320, mw.GROWN_HEIGHT["progress"]))
        g.wire(inv, model=unl[0], positive=pos_u[0], negative=neg_u[0], latent=e[0])
        inverted[half] = inv
        nodes += [ks, dec, e, inv]
    sl = cols[2].add("MemoRaSlerpLatents", f"Concept {side} slerp pairs", **c(PURPLE), intervals=10,
                     include_endpoints=True)
    g.wire(sl, latent_a=inverted["first"][0], latent_b=inverted["second"][0])
    rg = cols[3].add("MemoRaRegenerate", f"Concept {side} regenerate", **c(PURPLE), steps=50, start_at_step=15,
                     cfg=7.5, schedule="exact", size=(320, mw.GROWN_HEIGHT["progress"]))
    g.wire(rg, model=unl[0], positive=pos_u[0], negative=neg_u[0], latent=sl[0])
    tr = cols[3].add(K.NODE_LORA_TRAIN, f"{K.TITLE_TRAIN_LORA} (concept {side})", **c(PURPLE), steps=500, seed=2024,
                     save_name=f"memora/concept_{side.lower()}")
    g.wire(tr, model=unl[0], latents=rg[0], positive=pos_u[0])
    nodes += [sl, rg, tr]
    return tr, nodes, max(col.y for col in cols)


def build_multi(info):
    from memora_build.uigraph import UIGraph

    g = UIGraph(info)
    g.note(README_MULTI, "Read me", pos=(-560, 0), size=(520, 1000))
    col = Stack(g, 0)
    loaders = mw.model_loaders(g, col, True, mw.SD1_OWN)
    orig, unl = loaders["original"], loaders["unlearned"]
    prompts, enc = {}, {}
    for side, text in CONCEPTS.items():
        prompts[side] = col.add("PrimitiveStringMultiline", f"Concept {side} prompt", size=(400, 140), **c(YELLOW),
                                value=text)
    for model_name, loader in (("original", orig), ("unlearned", unl)):
        neg = g.wire(col.add("CLIPTextEncode", f"Empty prompt ({model_name} model)", size=(400, 130), text=""),
                     clip=loader[1])
        for side in CONCEPTS:
            pos = g.wire(col.add("CLIPTextEncode", f"Concept {side} prompt ({model_name} model)", size=(400, 130)),
                         clip=loader[1], text=prompts[side][0])
            enc[(side, model_name)] = (pos, neg)
    seed_size = col.add("EmptyLatentImage", K.TITLE_SEED_IMAGE_SIZE, width=512, height=512, batch_size=3)
    col.note(README_SEEDS, "Seed images", size=(420, 250))
    model_nodes = [orig, unl, seed_size] + list(prompts.values()) + [n for pair in enc.values() for n in pair]

    branches, branch_nodes, y = {}, {}, 0.0
    for side in CONCEPTS:
        tr, nodes, bottom = concept_branch(g, side, unl, orig, enc[(side, "original")], enc[(side, "unlearned")],
                                           seed_size, x=COL + 60, y=y)
        branches[side], branch_nodes[side] = tr, nodes
        y = bottom + 120

    mcol = Stack(g, COL * 5 + 120)
    merge = mcol.add("MemoRaMultiLoRAMerge", "Merge LoRAs", **c(PURPLE), size=(360, 460), method="concat",
                     save_name="memora/multi_memora")
    g.wire(merge, lora_1=branches["A"]["lora"], lora_2=branches["B"]["lora"])
    report = g.wire(mcol.add("PreviewAny", "Merge report", size=(360, 200)), source=merge["report"])
    mcol.note(README_MERGE, "Merge and sample", size=(420, 420))

    scol = Stack(g, COL * 6 + 160)
    apply = scol.add("LoraModelLoader", "Apply merged LoRA", strength_model=1.0)
    g.wire(apply, model=unl[0], lora=merge["lora"])
    ep = scol.add("PrimitiveStringMultiline", K.TITLE_EVALUATION_PROMPT, size=(400, 140), **c(YELLOW),
                  value=CONCEPTS["A"])
    p = g.wire(scol.add("CLIPTextEncode", "Evaluation prompt (unlearned model)", size=(400, 130)),
               clip=unl[1], text=ep[0])
    size = scol.add("EmptyLatentImage", K.TITLE_EVALUATION_IMAGE_SIZE, width=512, height=512, batch_size=1)
    ecol = Stack(g, COL * 7 + 200)
    ks = ecol.add("KSampler", "Sample with the merged LoRA", seed=0, steps=50, cfg=7.5, sampler_name="lms",
                  scheduler="normal", denoise=1.0)
    g.wire(ks, model=apply[0], positive=p[0], negative=enc[("A", "unlearned")][1][0], latent_image=size[0])
    dec = g.wire(ecol.add("VAEDecode", "Recovered images"), samples=ks[0], vae=unl[2])
    save = g.wire(ecol.add("SaveImage", "Save recovered images", size=(320, 320), filename_prefix="memora/multi"),
                  images=dec[0])
    g.group("1. Models and the concept prompts", model_nodes, color="#3f789e")
    for k, side in enumerate(CONCEPTS, start=2):
        g.group(f"{k}. Concept {side}: seed images, invert, slerp, regenerate, train its LoRA", branch_nodes[side],
                color="#a1309b")
    g.group("4. Merge the LoRAs", [merge, report], color="#8A8")
    g.group("5. Sample the unlearned model with the merged LoRA", [apply, ep, p, size, ks, dec, save],
            color="#b58b2a")
    return g


def build_auto(info):
    from memora_build.uigraph import UIGraph

    g = UIGraph(info)
    g.note(README_AUTO, "Read me", pos=(-560, 0), size=(520, 640))
    col = Stack(g, 0)
    unl = mw.model_loaders(g, col, False, mw.SD1_OWN)["unlearned"]
    lora = col.add("MemoRaLoadLoRA", "MemoRa LoRA", **c(BLUE), size=(400, 130),
                   lora_name="memora/recovered_00001_.safetensors")
    prompt = col.add("PrimitiveStringMultiline", "Prompt", size=(400, 140), **c(YELLOW),
                     value="a photo of the parachute")
    pos = g.wire(col.add("CLIPTextEncode", "Prompt (unlearned model)", size=(400, 130)), clip=unl[1], text=prompt[0])
    neg = g.wire(col.add("CLIPTextEncode", "Empty prompt", size=(400, 130), text=""), clip=unl[1])
    inputs = [unl, lora, prompt, pos, neg]

    col2 = Stack(g, COL + 40)
    guider = col2.add("MemoRaAutoGuider", "AutoMemoRa Guider", **c(PURPLE), cfg=7.5, w=2.0, main="lora")
    g.wire(guider, model=unl[0], lora=lora["lora"], positive=pos[0], negative=neg[0])
    plain = col2.add("CFGGuider", "Unlearned (no guidance)", cfg=7.5)
    g.wire(plain, model=unl[0], positive=pos[0], negative=neg[0])
    noise = col2.add("RandomNoise", "Noise", noise_seed=0)
    sampler = col2.add("KSamplerSelect", "Sampler", sampler_name="euler")
    sigmas = g.wire(col2.add("BasicScheduler", "Schedule", scheduler="normal", steps=50, denoise=1.0), model=unl[0])
    size = col2.add("EmptyLatentImage", "Image size", width=512, height=512, batch_size=1)
    setup = [guider, plain, noise, sampler, sigmas, size]

    outs = []
    for k, (name, gd) in enumerate((("AutoMemoRa", guider), ("Unlearned", plain))):
        colk = Stack(g, COL * (2 + k) + 80)
        sca = colk.add("SamplerCustomAdvanced", f"Sample ({name})")
        g.wire(sca, noise=noise[0], guider=gd[0], sampler=sampler[0], sigmas=sigmas[0], latent_image=size[0])
        dec = g.wire(colk.add("VAEDecode", f"{name} images"), samples=sca[0], vae=unl[2])
        sv = g.wire(colk.add("SaveImage", f"Save {name.lower()} images", size=(320, 320),
                             filename_prefix=f"memora/automemora_{name.lower()}"), images=dec[0])
        outs += [sca, dec, sv]
    g.group("1. Unlearned model, its MemoRa LoRA, the prompt", inputs, color="#3f789e")
    g.group("2. AutoMemoRa guidance (one copy of the weights)", setup, color="#a1309b")
    g.group("3. Sample: AutoMemoRa vs the unlearned model, same noise", outs, color="#b58b2a")
    return g


WORKFLOWS = {
    "multi_memora": (build_multi, "Multi-MemoRa: two concepts, two LoRAs, one merge"),
    "automemora": (build_auto, "AutoMemoRa: unlearned vs unlearned + LoRA guidance"),
}


def main(argv=None) -> int:
    return mw.generator_main(WORKFLOWS, "scripts/make_merge_workflows.py", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
