"""Generate example_workflows/attack_*.json (and thumbnails): the graphs ``memora-batch scoreboard`` runs, one per
recovery attack (memora_batch/attacks.py; MemoRa itself is memora_recovery.json).

Same machinery as scripts/make_workflows.py (UI format from the installed node definitions; Pillow thumbnails):

    python scripts/make_attack_workflows.py            # uses $COMFYUI_PATH or ~/comfy/ComfyUI
    python scripts/make_attack_workflows.py --check    # exit 1 if a committed file differs from what would be written

Every graph has memora_recovery's titles: the same loaders, concept prompt, the attacker's six concept images (the
original model's seed images, reference seed pairs), and the same evaluation of the original, unlearned and attacked
("recovered") models with the same prompt, seed and guidance, scored by "Concept score (...)" and "Similarity to
original (...)". A workflow whose attack node is not installed (a pack without it) is not written; --check says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _shared():
    """scripts/make_workflows.py (layout helpers, thumbnails, node definitions), imported by path."""
    spec = importlib.util.spec_from_file_location("memora_make_workflows", ROOT / "scripts" / "make_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mw = _shared()
Stack, c, COL, K = mw.Stack, mw.c, mw.COL, mw.K
BLUE, PURPLE, GREEN, YELLOW = mw.BLUE, mw.PURPLE, mw.GREEN, mw.YELLOW
sys.path.insert(0, str(ROOT))
from memora_batch import attacks as A  # noqa: E402

KEPT_CONCEPT = "a photo of a dog"
NEUTRAL_PROMPT = "a photo of a person"
OTHER_CONCEPT = "a photo of the church"


class Attacked:
    """What the attack hands the evaluation: the MODEL the attacked images are drawn with, and optionally the
    positive CONDITIONING (instead of the evaluation prompt), a LATENT (instead of the sampler) or the IMAGEs
    themselves (with the reference images their similarity is measured against)."""

    def __init__(self, model=None, positive=None, latent=None, images=None, reference=None):
        self.model, self.positive, self.latent, self.images, self.reference = model, positive, latent, images, \
            reference


def _eval_prompts(g, col, ep, loader):
    p = g.wire(col.add("CLIPTextEncode", None, size=(400, 130)), clip=loader[1], text=ep[0])
    n = g.wire(col.add("CLIPTextEncode", None, size=(400, 130), text=""), clip=loader[1])
    return p, n


def evaluation(g, models, attacked: Attacked, x, y, with_attacked=True):
    """The original, unlearned and attacked models drawn with the same prompt, seed, guidance and sampler (as
    memora_recovery evaluates), scored; the attacked model's images are the 'recovered' ones."""
    col0 = Stack(g, x, y)
    ep = col0.add("PrimitiveStringMultiline", K.TITLE_EVALUATION_PROMPT, size=(400, 140), **c(YELLOW),
                  value=mw.CONCEPT)
    es = col0.add("PrimitiveInt", K.TITLE_EVALUATION_SEED, **c(YELLOW), value=0)
    eg = col0.add("PrimitiveFloat", K.TITLE_EVALUATION_GUIDANCE, **c(YELLOW), value=7.5)
    size = col0.add("EmptyLatentImage", K.TITLE_EVALUATION_IMAGE_SIZE, width=512, height=512, batch_size=1)
    nodes, runs, row_y = [ep, es, eg, size], {}, y
    for name in ("original", "unlearned") + (("recovered",) if with_attacked else ()):
        cols = [Stack(g, x + COL * k, row_y) for k in (1, 2, 3)]
        loader = models["original" if name == "original" else "unlearned"]
        p, n = _eval_prompts(g, cols[0], ep, loader)
        p.data["title"], n.data["title"] = f"Evaluation prompt ({name})", f"Empty prompt ({name})"
        nodes += [p, n]
        att = attacked if name == "recovered" else Attacked()
        if att.images is None:
            latent = att.latent
            if latent is None:
                ks = cols[1].add("KSampler", K.evaluate_title(name), seed=0, steps=50, cfg=7.5, denoise=1.0,
                                 sampler_name="lms", scheduler="normal")
                g.wire(ks, model=att.model or loader[0], positive=att.positive or p[0], negative=n[0],
                       latent_image=size[0], seed=es[0], cfg=eg[0])
                nodes.append(ks)
                latent = ks[0]
            images = g.wire(cols[2].add("VAEDecode", f"{name.capitalize()} images"), samples=latent, vae=loader[2])
            nodes.append(images)
            runs[name] = images[0]
        else:
            runs[name] = att.images
        nodes.append(g.wire(cols[2].add("SaveImage", f"Save {name} images", size=(320, 250),
                                        filename_prefix=f"memora/attack_{name}"), images=runs[name]))
        row_y = max(cl.y for cl in cols)
    scores, sims = Stack(g, x + COL * 4, y), Stack(g, x + COL * 5, y)
    for name in runs:
        nodes.append(g.wire(scores.add("MemoRaNudityScore", K.concept_score_title(name), **c(GREEN),
                                       size=(400, mw.SCORE_HEIGHT["nudity"])), images=runs[name]))
    a, b = mw._sim_inputs(g)
    for name in [m for m in ("recovered", "unlearned") if m in runs]:
        ref = attacked.reference if name == "recovered" and attacked.reference is not None else runs["original"]
        nodes.append(g.wire(sims.add("MemoRaSimilarityScore", K.similarity_title(name), **c(GREEN),
                                     size=(400, mw.SCORE_HEIGHT["similarity"])), **{a: ref, b: runs[name]}))
    return nodes, {"prompt": ep, "seed": es, "guidance": eg, "size": size}


def _skeleton(info, readme: str, seeds: bool = True):
    """Graph, the models and concept encodings, and (``seeds``) the attacker's concept images: the original model's
    seed images (memora_recovery's, the reference seed pairs)."""
    from memora_build.uigraph import UIGraph

    g = UIGraph(info)
    g.note(readme, "Read me", pos=(-560, 0), size=(520, 700))
    models, enc, model_nodes = mw.models_and_prompts(g, with_original=True, x=0)
    batches, seed_nodes, bottom = (mw.seed_images(g, models, enc, x=COL + 60) if seeds else ({}, [], 0.0))
    g.group("1. Models and the concept prompt", model_nodes, color="#3f789e")
    if seed_nodes:
        g.group("2. The attacker's concept images (the original model's seed images)", seed_nodes, color="#8A8")
    return g, models, enc, batches, bottom


def _encoded(g, col, models, batches):
    """The six concept images in one batch, VAE-encoded with the unlearned model's VAE."""
    both = g.wire(col.add("ImageBatch", "Concept images"), image1=batches["A"][0], image2=batches["B"][0])
    lat = g.wire(col.add("VAEEncode", "Encode concept images"), pixels=both[0], vae=models["unlearned"][2])
    return both, lat


def _train(g, col, model, latents, positive, title=K.TITLE_TRAIN_LORA, save="memora/attack"):
    tr = col.add(K.NODE_LORA_TRAIN, title, **c(PURPLE), seed=2024, save_name=save, steps=500)
    return g.wire(tr, model=model, latents=latents, positive=positive)


def _bottom(g, at_least: float = 0.0) -> float:
    """The lowest edge of anything on the canvas so far."""
    return max([at_least] + [n["pos"][1] + n["size"][1] for n in g.nodes])


def _finish(g, models, attacked, attack_nodes, bottom, group: str, with_attacked=True):
    if attack_nodes:
        g.group(f"3. {group}", attack_nodes, color="#a1309b")
    nodes, ev = evaluation(g, models, attacked, x=0, y=_bottom(g, bottom) + 100, with_attacked=with_attacked)
    g.group("4. Evaluate the original, unlearned and attacked models (same prompt and seed)", nodes, color="#b58b2a")
    return g, ev


README_BASELINE = """No attack: the unlearned model with the plain prompt, drawn and scored as every attack's images are ("Concept score (recovered)" is the unlearned model itself). The scoreboard's Fisher test compares each attack's rate with this one (memora-batch scoreboard, docs/attacks.md)."""


def build_baseline(info):
    g, models, enc, _, bottom = _skeleton(info, README_BASELINE, seeds=False)
    unl = models["unlearned"]
    return _finish(g, models, Attacked(model=unl[0]), [], max(bottom, 1200), "No attack")[0]


README_DIRECT = """Direct relearning: the baseline every recovery attack must beat. The attacker's six concept images, VAE-encoded with the unlearned model's VAE, train the same LoRA as MemoRa (MemoRa LoRA Train, same recipe) directly: no inversion, no slerp, no regeneration. The scoreboard runs it on the unlearned model and on the never-learned control (--control): a model that never learned the concept learns it from these images too, so recovery means more than this."""


def build_direct(info):
    g, models, enc, batches, bottom = _skeleton(info, README_DIRECT)
    col = Stack(g, COL * 4 + 120)
    unl = models["unlearned"]
    both, lat = _encoded(g, col, models, batches)
    tr = _train(g, col, unl[0], lat[0], enc["unlearned"][0][0], save="memora/direct_relearning")
    return _finish(g, models, Attacked(model=tr[0]), [both, lat, tr], bottom, "Direct relearning: train the LoRA "
                   "on the concept images")[0]


README_RESURGENCE = """Concept resurgence: fine-tune the unlearned model on images of an UNRELATED concept it kept ("Kept concept prompt", drawn by the original model) and measure the erased one. The same LoRA recipe as MemoRa; no image of the erased concept is used."""


def build_resurgence(info):
    g, models, enc, _, bottom = _skeleton(info, README_RESURGENCE, seeds=False)
    col, col2 = Stack(g, COL + 60), Stack(g, COL * 2 + 100)
    orig, unl = models["original"], models["unlearned"]
    kept = col.add("PrimitiveStringMultiline", A.TITLE_KEPT_PROMPT, size=(400, 140), **c(YELLOW), value=KEPT_CONCEPT)
    kp_o = g.wire(col.add("CLIPTextEncode", "Kept concept prompt (original model)", size=(400, 130)),
                  clip=orig[1], text=kept[0])
    kp_u = g.wire(col.add("CLIPTextEncode", "Kept concept prompt (unlearned model)", size=(400, 130)),
                  clip=unl[1], text=kept[0])
    size = col2.add("EmptyLatentImage", A.TITLE_KEPT_SIZE, width=512, height=512, batch_size=A.SEED_IMAGES)
    ks = g.wire(col2.add("KSampler", A.TITLE_KEPT_IMAGES, seed=1805, steps=50, cfg=7.5, sampler_name="ddim",
                         scheduler="ddim_uniform", denoise=1.0),
                model=orig[0], positive=kp_o[0], negative=enc["original"][1][0], latent_image=size[0])
    dec = g.wire(col2.add("VAEDecode", "Decode kept images"), samples=ks[0], vae=orig[2])
    lat = g.wire(col2.add("VAEEncode", "Encode kept images"), pixels=dec[0], vae=unl[2])
    tr = _train(g, col2, unl[0], lat[0], kp_u[0], save="memora/resurgence")
    nodes = [kept, kp_o, kp_u, size, ks, dec, lat, tr]
    return _finish(g, models, Attacked(model=tr[0]), nodes, max(col.y, col2.y, bottom), "Concept resurgence: "
                   "train on a kept concept only")[0]


README_AUTO = """AutoMemoRa (w = 2): MemoRa's pipeline (invert, slerp, regenerate, train the LoRA), then the attacked images are drawn with the AutoMemoRa Guider, eps = eps_unlearned + 2 (eps_unlearned+LoRA - eps_unlearned), same prompt, seed (RandomNoise draws the KSampler's noise) and guidance as the other models."""


def build_automemora(info):
    g, models, enc, batches, bottom = _skeleton(info, README_AUTO)
    tr, inv_nodes, bottom2 = mw.inversion_to_training(g, models, enc, batches["A"], batches["B"], x=COL * 4 + 120,
                                                      save_images=False)
    g.set_widget(tr, "save_name", "memora/automemora")
    col = Stack(g, COL * 7 + 160)
    unl = models["unlearned"]
    guider = col.add("MemoRaAutoGuider", A.TITLE_AUTO_GUIDER, **c(PURPLE), cfg=7.5, w=2.0, main="lora")
    noise = col.add("RandomNoise", "AutoMemoRa noise", noise_seed=0)
    sampler = col.add("KSamplerSelect", A.TITLE_AUTO_SAMPLER, sampler_name="lms")
    sigmas = g.wire(col.add("BasicScheduler", A.TITLE_AUTO_SCHEDULE, scheduler="normal", steps=50, denoise=1.0),
                    model=unl[0])
    sca = col.add("SamplerCustomAdvanced", A.TITLE_AUTO_EVALUATE)
    nodes = inv_nodes + [guider, noise, sampler, sigmas, sca]
    g.group("3. MemoRa, then AutoMemoRa guidance (w = 2)", nodes, color="#a1309b")
    ev_nodes, ev = evaluation(g, models, Attacked(latent=sca[0]), x=0, y=_bottom(g) + 100)
    p_unl = next(n for n in g._nodes.values() if n.data.get("title") == "Evaluation prompt (recovered)")
    n_unl = next(n for n in g._nodes.values() if n.data.get("title") == "Empty prompt (recovered)")
    g.wire(guider, model=unl[0], lora=tr[1], positive=p_unl[0], negative=n_unl[0], cfg=ev["guidance"][0])
    g.wire(noise, noise_seed=ev["seed"][0])
    g.wire(sca, noise=noise[0], guider=guider[0], sampler=sampler[0], sigmas=sigmas[0], latent_image=ev["size"][0])
    g.group("4. Evaluate the original, unlearned and attacked models (same prompt and seed)", ev_nodes,
            color="#b58b2a")
    return g


README_MULTI = """Multi-MemoRa: a model with SEVERAL erased concepts. One MemoRa LoRA per concept ("Concept prompt": the one measured; "Other erased concept prompt": the model's other erased concept), each from the original model's seed images of its concept, merged by MemoRa Multi-LoRA Merge (concat: exact) and applied to the unlearned model; the measured concept's rate is the row."""


def _shift(nodes, dy: float):
    for n in nodes:
        n.data["pos"][1] += dy


def build_multi(info):
    g, models, enc, batches, bottom = _skeleton(info, README_MULTI)
    tr, nodes_a, bottom_a = mw.inversion_to_training(g, models, enc, batches["A"], batches["B"], x=COL * 4 + 120,
                                                     save_images=False)
    g.set_widget(tr, "save_name", "memora/multi_a")
    dy = max(bottom, bottom_a) + 100
    col = Stack(g, 0, dy)
    orig, unl = models["original"], models["unlearned"]
    other = col.add("PrimitiveStringMultiline", A.TITLE_OTHER_PROMPT, size=(400, 140), **c(YELLOW),
                    value=OTHER_CONCEPT)
    enc_o = {}
    for name, loader in (("original", orig), ("unlearned", unl)):
        pos = g.wire(col.add("CLIPTextEncode", f"Other concept prompt ({name} model)", size=(400, 130)),
                     clip=loader[1], text=other[0])
        enc_o[name] = (pos, enc[name][1])
    b_other, seed_nodes, seed_bottom = mw.seed_images(g, models, enc_o, x=COL + 60)
    tr_b, nodes_b, bottom_b = mw.inversion_to_training(g, models, enc_o, b_other["A"], b_other["B"],
                                                       x=COL * 4 + 120, save_images=False)
    _shift(seed_nodes + nodes_b, dy)
    for n in g.nodes[-(len(seed_nodes) + len(nodes_b) + 2):]:
        if n.get("type") in ("Note", "MarkdownNote"):
            n["pos"][1] += dy
    tr_b.data["title"] = A.TITLE_TRAIN_OTHER
    g.set_widget(tr_b, "save_name", "memora/multi_b")
    mcol = Stack(g, COL * 7 + 160)
    merge = g.wire(mcol.add("MemoRaMultiLoRAMerge", "Merge LoRAs", **c(PURPLE), size=(360, 460), method="concat"),
                   lora_1=tr[1], lora_2=tr_b[1])
    apply = g.wire(mcol.add("LoraModelLoader", "Apply merged LoRA", strength_model=1.0), model=unl[0],
                   lora=merge[0])
    g.group("3. Multi-MemoRa: a LoRA per erased concept (the measured one above, the other below), merged",
            nodes_a + [merge, apply], color="#a1309b")
    g.group("3b. The other erased concept: its seed images and its MemoRa LoRA",
            [other] + [p for p, _ in enc_o.values()] + seed_nodes + nodes_b, color="#a1309b")
    y = dy + max(seed_bottom, bottom_b, col.y - dy, mcol.y) + 100
    ev_nodes, _ = evaluation(g, models, Attacked(model=apply[0]), x=0, y=_bottom(g, y) + 100)
    g.group("4. Evaluate the original, unlearned and attacked models (same prompt and seed)", ev_nodes,
            color="#b58b2a")
    return g


# -- the attacks of issue 21's attack nodes (written when their nodes are installed) -----------------------------------
README_TI = """Textual inversion (Pham et al., ICLR 2024, "Circumventing Concept Erasure Methods"): a new token's embedding is learned on the attacker's concept images with the unlearned model frozen; the attacked images are drawn from the prompt with that token (MemoRa Textual Inversion's positive output). Details: docs/attack-embeddings.md."""

README_ADV = """Adversarial prompt in the spirit of UnlearnDiffAtk (Zhang et al., ECCV 2024): prompt tokens optimised so that the unlearned model's own denoising loss on the attacker's concept images is low (the diffusion model as its own classifier). Details: docs/attack-embeddings.md."""

README_VECTOR = """Concept vector in the spirit of Ring-A-Bell (Tsai et al., ICLR 2024): a direction in text-embedding space from concept vs neutral prompts, added to the evaluation prompt's embedding with a strength. Needs the text encoder only. Details: docs/attack-probes.md."""

README_NOISE = """Noise-injection probe ("When Are Concepts Erased From Diffusion Models?", NeurIPS 2025): the unlearned model samples the evaluation prompt with noise injected along the DDIM trajectory. Details: docs/attack-probes.md."""

README_INPAINT = """Inpainting probe ("When Are Concepts Erased From Diffusion Models?", NeurIPS 2025): the attacker's concept images, partly masked, inpainted by the unlearned model; similarity is measured against the unmasked images. Details: docs/attack-probes.md."""


def _with_images(info, readme: str, title: str, node_type: str, group: str, **values):
    """An attack node fed the unlearned model, its text encoder and the encoded concept images; its positive output
    conditions the attacked images."""
    g, models, enc, batches, bottom = _skeleton(info, readme)
    col = Stack(g, COL * 4 + 120)
    unl = models["unlearned"]
    both, lat = _encoded(g, col, models, batches)
    node = g.wire(col.add(node_type, title, **c(PURPLE), **values), model=unl[0], clip=unl[1], latents=lat[0])
    return g, models, node, [both, lat, node], max(bottom, col.y)


def build_textual_inversion(info):
    g, models, node, nodes, bottom = _with_images(info, README_TI, "Textual inversion", "MemoRaTextualInversion",
                                                  "Textual inversion", token="<memora-concept>", init_word="person",
                                                  save_name="memora/attack_concept")
    return _finish(g, models, Attacked(positive=node[0]), nodes, bottom, "Textual inversion on the concept "
                   "images")[0]


def build_adversarial_prompt(info):
    g, models, node, nodes, bottom = _with_images(info, README_ADV, "Adversarial prompt", "MemoRaAdversarialPrompt",
                                                  "Adversarial prompt")
    g2, ev = _finish(g, models, Attacked(positive=node[0]), nodes, bottom, "Adversarial prompt on the concept "
                     "images")
    g.wire(node, prompt=ev["prompt"][0])
    return g


def build_concept_vector(info):
    g, models, enc, _, bottom = _skeleton(info, README_VECTOR, seeds=False)
    col = Stack(g, COL + 60)
    unl = models["unlearned"]
    neutral = col.add("PrimitiveStringMultiline", A.TITLE_NEUTRAL_PROMPT, size=(400, 140), **c(YELLOW),
                      value=NEUTRAL_PROMPT)
    cv = col.add("MemoRaConceptVector", "Concept vector", **c(PURPLE))
    g2, ev = _finish(g, models, Attacked(positive=cv[0]), [neutral, cv], max(bottom, col.y, 1200),
                     "Concept vector (text encoder only)")
    concept = next(n for n in g._nodes.values() if n.data.get("title") == K.TITLE_CONCEPT_PROMPT)
    g.wire(cv, clip=unl[1], concept_prompts=concept[0], neutral_prompts=neutral[0], prompt=ev["prompt"][0])
    return g


def build_noise_probe(info):
    g, models, enc, _, bottom = _skeleton(info, README_NOISE, seeds=False)
    col = Stack(g, COL + 60)
    probe = col.add("MemoRaNoiseInjectionProbe", "Noise-injection probe", **c(PURPLE))
    g2, ev = _finish(g, models, Attacked(latent=probe[0]), [probe], max(bottom, col.y, 1200),
                     "Noise-injection probe")
    p = next(n for n in g._nodes.values() if n.data.get("title") == "Evaluation prompt (recovered)")
    n = next(n for n in g._nodes.values() if n.data.get("title") == "Empty prompt (recovered)")
    g.wire(probe, model=models["unlearned"][0], positive=p[0], negative=n[0], latent_image=ev["size"][0],
           seed=ev["seed"][0], cfg=ev["guidance"][0])
    return g


def build_inpainting_probe(info):
    g, models, enc, batches, bottom = _skeleton(info, README_INPAINT)
    col = Stack(g, COL * 4 + 120)
    unl = models["unlearned"]
    both = g.wire(col.add("ImageBatch", "Concept images"), image1=batches["A"][0], image2=batches["B"][0])
    probe = col.add("MemoRaInpaintingProbe", "Inpainting probe", **c(PURPLE))
    g2, ev = _finish(g, models, Attacked(images=probe[0], reference=both[0]), [both, probe], max(bottom, col.y),
                     "Inpainting probe on the concept images")
    p = next(n for n in g._nodes.values() if n.data.get("title") == "Evaluation prompt (unlearned)")
    n = next(n for n in g._nodes.values() if n.data.get("title") == "Empty prompt (unlearned)")
    g.wire(probe, model=unl[0], vae=unl[2], positive=p[0], negative=n[0], pixels=both[0], seed=ev["seed"][0],
           cfg=ev["guidance"][0])
    return g


WORKFLOWS = {
    "attack_baseline": (build_baseline, "No attack: the unlearned model with the plain prompt"),
    "attack_direct_relearning": (build_direct, "Direct relearning: the LoRA on the concept images"),
    "attack_resurgence": (build_resurgence, "Concept resurgence: the LoRA on a kept concept"),
    "attack_automemora": (build_automemora, "AutoMemoRa (w=2) on MemoRa's LoRA"),
    "attack_multi_memora": (build_multi, "Multi-MemoRa: a LoRA per erased concept, merged"),
    "attack_textual_inversion": (build_textual_inversion, "Textual inversion on the concept images"),
    "attack_adversarial_prompt": (build_adversarial_prompt, "Adversarial prompt (UnlearnDiffAtk-style)"),
    "attack_concept_vector": (build_concept_vector, "Concept vector (Ring-A-Bell-style)"),
    "attack_noise_probe": (build_noise_probe, "Noise-injection probe"),
    "attack_inpainting_probe": (build_inpainting_probe, "Inpainting probe"),
}
#: the node types (beyond memora_recovery's) each workflow needs: from memora_batch/attacks.py
NEEDS = {a.workflow: a.nodes for a in A.ATTACKS}


def installed(info: dict) -> tuple[dict, list[str]]:
    """(the workflows whose node types are installed, a line per workflow that is not)."""
    ok, missing = {}, []
    for name, spec in WORKFLOWS.items():
        absent = [t for t in NEEDS.get(name, ()) if t not in info]
        if absent:
            missing.append(f"{name}: not built, node type(s) {', '.join(absent)} not installed")
        else:
            ok[name] = spec
    return ok, missing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    ap.add_argument("--comfyui", default=None)
    ap.add_argument("--only", action="append", default=[], help="build only these workflows")
    args = ap.parse_args(argv)
    info = mw.node_definitions(args.comfyui)
    workflows, missing = installed(info)
    for line in missing:
        print(line)
    return mw.write_workflows(workflows, info, check=args.check, only=args.only,
                              script="scripts/make_attack_workflows.py")


if __name__ == "__main__":
    sys.exit(main())
