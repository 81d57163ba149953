"""The micro world in ComfyUI: load its original, never-learned and unlearned models, and score images per concept.

The micro world (memora/micro, docs/micro-world.md) is a tiny SD1.x-family text-to-image model trained on five
procedural shape concepts, with the star erased by several published methods (ESD-x, ESD-u, UCE, a deeper ESD-u;
star and cross by ESD-x); small enough to run MemoRa end to end on a CPU."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from memora.micro import data, world
from memora.evaluation.stats import format_rate, rate_record
from memora.micro import detector as _det
from memora.micro import judge as _judge
from . import _host, _micro_host, _schema


_VARIANT_HELP = ("original: trained on all five shapes; never_learned: trained the same way without stars; the "
                 "rest are the original with the star erased: esd_x (ESD, cross-attention, 30 updates), esd_x_long "
                 "(the same, 60 updates), esd_u (ESD, every other layer), uce (Unified Concept Editing, closed-form key/value edit), esd_u_deep (ESD-u, five times "
                 "longer, guidance 2, kept concepts preserved), esd_x_star_cross (ESD-x, star and cross erased).")


class MemoRaLoadMicroWorld(_schema.MemoRaNode):
    """Loads the micro world shipped with the pack: a tiny Stable Diffusion 1.x-family model (UNet, CLIP text
    encoder, VAE; about 1.8 M UNet parameters) trained on five procedural shapes (circle, square, triangle, star,
    cross) at 32 x 32 pixels, in eight variants: the original, a never-learned model (no stars in its data) and six
    unlearned ones made from the original by published erasure methods (docs/micro-world.md). Every file is checked
    against the sha256 in the world's manifest: a changed file is refused. Its VAE downsamples 4x (SD's 8x): an
    Empty Latent Image of 64 x 64 gives its 8 x 8 latents, which decode to 32 x 32 images. Nothing is registered
    with ComfyUI's checkpoint detection: real checkpoints load exactly as before."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa Load Micro World", "micro world", inputs=[
            io.Combo.Input("variant", options=list(world.VARIANTS), default=world.DEFAULT_VARIANT,
                           tooltip=_VARIANT_HELP),
        ], outputs=[
            io.Model.Output(display_name="MODEL", tooltip="The micro UNet (SD1.x family, eps prediction)."),
            io.Clip.Output(display_name="CLIP", tooltip="The micro CLIP text encoder (SD1 tokenizer, width 64); "
                                                        "shared by every variant."),
            io.Vae.Output(display_name="VAE", tooltip="The micro VAE (4x downsampling, 4 latent channels); "
                                                      "shared by every variant."),
            io.String.Output(display_name="erased_prompt",
                             tooltip="The prompt of the erased concept ('a photo of a star'), for CLIP Text "
                                     "Encode and MemoRa's recovery; for esd_x_star_cross the first of its two "
                                     "(every prompt: erased_prompts)."),
            io.String.Output(display_name="erased_prompts",
                             tooltip="Every erased concept's prompt, one per line ('a photo of a star' and, for "
                                     "esd_x_star_cross, 'a photo of a cross'): one MemoRa recovery per line, as "
                                     "Multi-MemoRa does. The original and never_learned give the star's."),
        ])

    @classmethod
    def execute(cls, variant) -> io.NodeOutput:
        world.check_variant(variant)
        model, clip, vae, manifest = _micro_host.load_world(variant)
        return io.NodeOutput(model, clip, vae, world.erased_prompt(manifest, variant),
                             world.erased_prompts(variant, manifest))


class MemoRaMicroDetector(_schema.MemoRaNode):
    """Names the shape in each image with the micro world's concept detector (a small CNN trained by the build
    script on fresh procedural images; its held-out accuracy is in the micro world's manifest and
    docs/micro-world.md). An image counts as showing a concept when that concept is the detector's top class among
    circle, square, triangle, star, cross and none. Images of another size are resized to 32 x 32."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa Micro World Detector", "micro world", is_output_node=True, inputs=[
            _schema.images_input("images", "Images to score (e.g. decoded micro-world samples)."),
            io.Combo.Input("concept", options=list(data.CONCEPTS), default=world.ERASED_CONCEPT,
                           tooltip="The concept whose rate is returned as the FLOAT output (the report lists "
                                   "every concept)."),
            io.String.Input("title", default="micro world detector",
                            tooltip="Title of the score table shown on the node and sent to the editor."),
        ], outputs=[
            io.Float.Output(display_name="rate", tooltip="Share of images (0..1) whose top class is the chosen "
                                                         "concept."),
            _schema.report_output("Per-concept rates and mean probabilities, and the top class of every image."),
        ])

    @classmethod
    def execute(cls, images, concept, title) -> io.NodeOutput:
        data.check_concept(concept)
        x = _det.prepare(images)
        probs = _det.probabilities(load_detector(), x)
        # the judge sees exactly what the detector saw (the same 32 x 32 resize)
        judged = _judge.judge_batch(((x + 1) / 2).permute(0, 2, 3, 1).numpy())
        tables, report = score_tables(probs, judged, concept, title)
        rate = next(r[1] for r in tables[0]["rows"] if r[0] == concept)
        return io.NodeOutput(rate, report, ui=_host.publish_scores(tables))


_DETECTOR_CACHE: dict = {}


def load_detector() -> _det.Detector:
    """The shipped detector (read once per file version; it is small and never modified)."""
    import comfy.utils

    manifest = world.load_manifest()
    path = world.weight_path("detector", manifest=manifest)
    key = (str(path), path.stat().st_mtime_ns, path.stat().st_size)
    if key not in _DETECTOR_CACHE:
        # built and filled outside inference mode: the executor runs nodes under it, and a module created there
        # holds inference tensors that load_state_dict could not copy into
        with torch.inference_mode(False):
            sd = comfy.utils.load_torch_file(str(path), safe_load=True)
            det = _det.from_state_dict({k: v.clone() for k, v in sd.items()})
        _DETECTOR_CACHE.clear()
        _DETECTOR_CACHE[key] = det.eval()
    return _DETECTOR_CACHE[key]


CONVENTION = "micro-top1"
AGREEMENT_CONVENTION = "micro-top1-vs-judge"
COLUMNS = ["concept", "rate", "n", "ci_low", "ci_high", "convention", "judge_rate", "judge_ci_low",
           "judge_ci_high", "agreement", "mean probability"]


def score_tables(probs: torch.Tensor, judged: list, concept: str, title: str) -> tuple[list, str]:
    """The per-class table (one row per class: the detector's rate with its Wilson interval, the judge's rate and
    interval, and the share of images on which both agree whether the image shows that class), a one-row table of
    the overall detector-judge agreement (same label), and the text report."""
    classes = data.DETECTOR_CLASSES
    top = [classes[i] for i in probs.argmax(-1).tolist()]
    n = len(top)
    mean_p = probs.mean(0).tolist()
    rows, records = [], {}
    for i, c in enumerate(classes):
        records[c] = det_rec = rate_record(sum(t == c for t in top), n, CONVENTION)
        jud_rec = rate_record(sum(j == c for j in judged), n, "micro-judge")
        agree = sum((t == c) == (j == c) for t, j in zip(top, judged)) / n
        rows.append([c, det_rec["rate"], n, round(det_rec["ci_low"], 4), round(det_rec["ci_high"], 4), CONVENTION,
                     jud_rec["rate"], round(jud_rec["ci_low"], 4), round(jud_rec["ci_high"], 4), agree,
                     round(mean_p[i], 4)])
    agr = _judge.agreement(top, judged)
    agr_rec = rate_record(agr["k"], n, AGREEMENT_CONVENTION)
    table = {"title": str(title), "columns": list(COLUMNS), "rows": rows}
    summary = {"title": f"{title}: detector vs judge",
               "columns": ["agreement", "agreement_ci_low", "agreement_ci_high", "n_images", "convention"],
               "rows": [[agr_rec["rate"], round(agr_rec["ci_low"], 4), round(agr_rec["ci_high"], 4), n,
                         AGREEMENT_CONVENTION]]}
    lines = [f"{title}: {n} images; rate of '{concept}' = {format_rate(records[concept])}",
             f"judge (geometric, no learned weights): rate of '{concept}' = {rows[classes.index(concept)][6]:.3f}; "
             "detector and judge give "
             f"the same label on {format_rate(agr_rec)}",
             "concept      rate  95% CI         judge  agreement  mean p"]
    lines += [f"{r[0]:<10} {r[1]:>6.3f}  {r[3]:.3f}-{r[4]:.3f}  {r[6]:>6.3f}  {r[9]:>9.3f}  {r[10]:>6.3f}" for r in rows]
    lines.append("top class per image (detector/judge): " + ", ".join(
        t if t == j else f"{t}/{j}" for t, j in zip(top, judged)))
    return [table, summary], "\n".join(lines)


NODES = [MemoRaLoadMicroWorld, MemoRaMicroDetector]
