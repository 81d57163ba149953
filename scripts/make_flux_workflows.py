"""Generate example_workflows/memora_recovery_flux.json and its thumbnail: MemoRa on Flux dev (issue 23).

Same machinery as scripts/make_workflows.py (UI format written from the installed node definitions, so widget values
sit where the editor expects them; Pillow diagram thumbnails drawn from the workflow itself):

    python scripts/make_flux_workflows.py            # uses $COMFYUI_PATH or ~/comfy/ComfyUI
    python scripts/make_flux_workflows.py --check    # exit 1 if the committed files differ

The graph: the original Flux dev draws the seed images (the reference seed pairs, euler / simple, cfg 1 with
FluxGuidance 3.5, as ComfyUI's Flux examples sample) -> the unlearned model encodes, inverts (MemoRa Flow Inversion),
slerps within pairs and regenerates (MemoRa Flow Regenerate). ``WITH_TRAINING`` (on): MemoRa LoRA Train on the
regenerated latents with the flow-matching objective (docs/flux-training.md); off, the graph stops at the regenerated
images and a note marks the place. No evaluation stage yet. Titles are
addresses (memora-batch, docs/flux.md, the tests): keep them stable.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))
import make_workflows as mw  # noqa: E402  (layout helpers, thumbnails, node definitions, the shared stages)
from make_workflows import COL, K, PURPLE, Stack, c  # noqa: E402

#: MemoRa LoRA Train on Flux (and the evaluation after it) lands with issue 23's training part: set True then,
#: regenerate, and the workflow test runs the whole pipeline.
WITH_TRAINING = True

FLUX_DEV = ("flux1-dev-fp8.safetensors", "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/"
            "flux1-dev-fp8.safetensors", "checkpoints")  # all-in-one (transformer, CLIP-L + T5, VAE), ComfyUI's
FLUX = mw.Arch(FLUX_DEV[0], "unlearned/unlearned-flux.safetensors", 1024, models={FLUX_DEV[0]: FLUX_DEV[1:]})
CONCEPT = "a photo of the parachute"
#: the Flux settings: steps and start keep MemoRa's 15 of 50 (30%) at Flux's usual 28 steps; distilled guidance 3.5
FLUX_STEPS, FLUX_START, FLUX_GUIDANCE, REFINE = 28, 8, 3.5, 2
SAMPLER = {"sampler_name": "euler", "scheduler": "simple", "cfg": 1.0}
FLOW = {"steps": FLUX_STEPS, "start_at_step": FLUX_START, "scheduler": "simple", "cfg": 1.0, "true_cfg": False}

README = """MemoRa on Flux dev: recover an erased concept from an unlearned Flux model (Memory Self-Regeneration, arXiv 2510.03263, on a rectified-flow model: docs/flux.md).

LOAD
- "Original model": Flux dev BEFORE unlearning, the all-in-one flux1-dev-fp8.safetensors (transformer, CLIP-L + T5 text encoders, VAE) in models/checkpoints (the editor offers the download).
- "Unlearned model" (MemoRa Load Unlearned Model): ckpt_name = the Flux base; unlearned_weights = the erased model (models/unlearned).
- "Concept prompt": the erased concept, e.g. "a photo of the parachute".

PROMPTS: CLIP Text Encode with the Flux text encoders, then FluxGuidance (3.5): Flux dev is guidance-distilled, so every sampler here runs at cfg 1 (one model call per step; the empty prompt is only the KSampler's required negative and is never evaluated at cfg 1). True CFG: MemoRa Flow Inversion / Regenerate's true_cfg with cfg > 1 and a negative.

RUN (Queue): seed images (original model; reference seed pairs; euler / simple, 28 steps) -> the unlearned model encodes, inverts the flow ODE to step 8 of 28 (MemoRa's 15 of 50), slerps within each pair (33 latents) and regenerates -> training and evaluation (see the note in group 3).

The inverted latents continue identically through the stock SamplerCustomAdvanced: euler, DisableNoise, BasicScheduler (simple, 28 steps) split at step 8 by SplitSigmas (low_sigmas), BasicGuider with the FluxGuidance conditioning.

Flux dev at 1024 px needs a GPU (docs/performance.md). Keep the titles: memora-batch addresses nodes by title."""

NOTE_TRAINING = """Training: MemoRa LoRA Train ("Train LoRA", latents = "Regenerate", positive = the unlearned model's concept prompt with FluxGuidance) on Flux trains with the flow-matching objective; it lands with issue 23's training part (docs/flux.md). Until then, train a Flux LoRA on the regenerated images ("Save regenerated images") with your trainer, and load it with LoraLoader on the unlearned model."""


def loaders_and_prompts(g, x):
    """The Flux loaders and the concept prompt, FluxGuidance after each model's concept prompt."""
    return mw.models_and_prompts(g, True, x, FLUX, CONCEPT, flux_guidance=FLUX_GUIDANCE)


def seed_images(g, models, enc, x):
    """One KSampler per reference seed with the ORIGINAL model (Flux: euler / simple, cfg 1, FluxGuidance)."""
    return mw.seed_images(g, models, enc, x, steps=FLUX_STEPS, size_px=FLUX.size, latent_node="EmptySD3LatentImage",
                          sampler=SAMPLER, prefix="memora/flux_seed", note=False)


def invert_slerp_regenerate(g, models, enc, batches, x):
    unl, (pos, _neg) = models["unlearned"], enc["unlearned"]
    col1, col2, col3 = Stack(g, x), Stack(g, x + COL), Stack(g, x + 2 * COL)
    nodes, lat = [], {}
    for side in "AB":
        e = g.wire(col1.add("VAEEncode", f"Encode {side}"), pixels=batches[side][0], vae=unl[2])
        inv = col1.add("MemoRaFlowInversion", f"Invert {side}", **c(PURPLE), refine_iterations=REFINE,
                       size=(320, mw.GROWN_HEIGHT["progress"] + 60), **FLOW)
        g.wire(inv, model=unl[0], positive=pos[0], latent=e[0])
        lat[side] = inv
        nodes += [e, inv]
    sl = g.wire(col2.add("MemoRaSlerpLatents", "Slerp pairs", **c(PURPLE), intervals=10, include_endpoints=True),
                latent_a=lat["A"][0], latent_b=lat["B"][0])
    rg = g.wire(col2.add("MemoRaFlowRegenerate", "Regenerate", **c(PURPLE), size=(320, mw.GROWN_HEIGHT["progress"]),
                         **FLOW), model=unl[0], positive=pos[0], latent=sl[0])
    dec = g.wire(col2.add("VAEDecode", "Regenerated images"), samples=rg[0], vae=unl[2])
    save = g.wire(col2.add("SaveImage", "Save regenerated images", size=(320, 320),
                           filename_prefix="memora/flux_regenerated"), images=dec[0])
    nodes += [sl, rg, dec, save]
    if WITH_TRAINING:
        tr = col3.add(K.NODE_LORA_TRAIN, K.TITLE_TRAIN_LORA, **c(PURPLE), seed=2024, save_name="memora/recovered_flux",
                      steps=500)
        nodes.append(g.wire(tr, model=unl[0], latents=rg[0], positive=pos[0]))
    else:
        col3.note(NOTE_TRAINING, "Train LoRA: the place for MemoRa LoRA Train", size=(420, 300))
    return nodes, max(col1.y, col2.y, col3.y)


def build_recovery_flux(info):
    from memora_build.uigraph import UIGraph

    g = UIGraph(info)
    g.note(README, "Read me", pos=(-560, 0), size=(520, 900))
    models, enc, model_nodes = loaders_and_prompts(g, x=0)
    batches, seed_nodes, _ = seed_images(g, models, enc, x=COL + 60)
    inv_nodes, _ = invert_slerp_regenerate(g, models, enc, batches, x=COL * 4 + 120)
    g.group("1. Flux models and the concept prompt (FluxGuidance: distilled guidance)", model_nodes, color="#3f789e")
    g.group("2. Seed images from the original model (reference seed pairs)", seed_nodes, color="#8A8")
    g.group("3. Invert the flow ODE, slerp, regenerate (then train the MemoRa LoRA)", inv_nodes, color="#a1309b")
    return g


WORKFLOWS = {
    "memora_recovery_flux": (build_recovery_flux, "MemoRa recovery on Flux dev: flow inversion, slerp, "
                                                  "regeneration"),
}


def main(argv=None) -> int:
    return mw.generator_main(WORKFLOWS, "scripts/make_flux_workflows.py", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
