"""CLIP scores: image-text alignment (CLIP score) and a zero-shot style rate, from a local transformers CLIP folder.

**CLIP score** (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning"): the cosine
similarity of CLIP's image and text embeddings. Unlearning papers report 100 x cosine averaged over images with
torchmetrics' ``CLIPScore`` (ViT-L/14 by default), which clamps the *mean* at 0 (``max(mean(100 * cos), 0)``);
Hessel et al.'s own CLIP-S is ``2.5 * max(cos, 0)``, clamped *per image*. The pack (convention ``clip-score-100``)
clamps per image, ``mean(100 * max(cos, 0))``: the two agree whenever every cosine is positive (CLIP's image-text
cosines of real images and prompts are), and differ only when some image's is negative. Every raw cosine is stored,
so either can be recomputed.

**Zero-shot style rate** (convention ``clip-zeroshot-style``): each image is compared with one prompt per artist,
``template.format(artist)`` for the target and every other artist of a list; an image counts when its most similar
prompt is the target's. The rate is the share of images that count; every image's cosines are stored.

The model: a transformers ``CLIPModel`` folder (``config.json`` with ``model_type`` ``clip``, ``model.safetensors``
or ``pytorch_model.bin``, the tokenizer files ``vocab.json`` + ``merges.txt`` or ``tokenizer.json``, and
``preprocessor_config.json``; e.g. ``openai/clip-vit-large-patch14``). Both towers are needed: ComfyUI's CLIP Vision
files hold only the image tower and cannot score text. Nothing is downloaded.

Images reach CLIP as 8-bit RGB (as SaveImage writes them) through the folder's ``CLIPImageProcessor`` (CLIP's
resize of the shorter side to 224 bicubic, center crop 224, CLIP mean / std for ViT-L/14)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import conventions, stats
from .objects import ClassifierFileError, read_hf_config, to_uint8

CLIP_SCORE = "clip-score-100"        # a mean: no counting convention, nothing to rescore
ZERO_SHOT = "clip-zeroshot-style"    # defined in memora.evaluation.conventions.CONVENTIONS
MEAN_COLUMNS = ["mean", "n", "ci_low", "ci_high", "convention"]
DEFAULT_TARGET = "Van Gogh"
DEFAULT_TEMPLATE = "a painting in the style of {}"
# The other artists a style prompt competes with: ESD's (Gandikota et al. 2023) artist set (famous and modern
# artists) without the target, plus Claude Monet and Salvador Dali.
DEFAULT_OTHERS = ("Pablo Picasso", "Rembrandt", "Andy Warhol", "Caravaggio", "Claude Monet", "Salvador Dali",
                  "Kelly McKernan", "Thomas Kinkade", "Tyler Edlin", "Kilian Eng")
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


@dataclass
class Clip:
    model: torch.nn.Module
    tokenizer: object
    processor: object
    name: str

    def describe(self) -> dict:
        v = self.model.config.vision_config
        return {"source": "transformers CLIPModel", "weights": self.name,
                "vision": f"ViT patch {v.patch_size}, {v.image_size} px, width {v.hidden_size}, {v.num_hidden_layers} "
                          f"layers", "projection_dim": int(self.model.config.projection_dim)}


def load_clip(folder) -> Clip:
    """A transformers CLIPModel folder (both towers, tokenizer, image processor), from local files only."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    if folder.is_file():
        raise ClassifierFileError(f"{folder.name} is a single file: the CLIP score needs a transformers CLIPModel "
                                  f"folder (config.json, model.safetensors, tokenizer, preprocessor_config.json); "
                                  f"ComfyUI's CLIP Vision files hold only the image tower")
    cfg = read_hf_config(folder)
    kind = cfg.get("model_type")
    if kind == "clip_vision_model":
        raise ClassifierFileError(f"{folder.name}/ holds only CLIP's vision tower: the score needs the text tower "
                                  f"too (a full CLIPModel folder such as openai/clip-vit-large-patch14)")
    if kind != "clip":
        raise ClassifierFileError(f"{folder.name}/ is a {kind!r} model, not a CLIP model (config.json model_type "
                                  f"'clip')")
    if not any(all((folder / f).is_file() for f in group) for group in TOKENIZER_FILES):
        raise ClassifierFileError(f"{folder.name}/ has no tokenizer: expected vocab.json + merges.txt or "
                                  f"tokenizer.json (as in openai/clip-vit-large-patch14)")
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ClassifierFileError(f"{folder.name}/ could not be loaded as a CLIPModel: {type(e).__name__}: {e}") from e
    if (folder / "preprocessor_config.json").is_file():
        proc = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    else:
        size = int(model.config.vision_config.image_size)
        proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return Clip(model, tok, proc, folder.name + "/")


@torch.inference_mode()
def image_embeddings(clip: Clip, images: torch.Tensor, device=None, batch_size: int = 8) -> torch.Tensor:
    """Unit-length image embeddings [B, D] (float32, CPU) of a ComfyUI IMAGE batch."""
    arr = to_uint8(images)
    device = torch.device(device or "cpu")
    model = clip.model.to(device)
    out = []
    for i in range(0, arr.shape[0], batch_size):
        px = clip.processor(images=list(arr[i:i + batch_size]), return_tensors="pt")["pixel_values"]
        out.append(_features(model.get_image_features(pixel_values=px.to(device, torch.float32))).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@torch.inference_mode()
def text_embeddings(clip: Clip, texts: Sequence[str], device=None) -> torch.Tensor:
    """Unit-length text embeddings [T, D] (CLIP's 77-token context; longer prompts are truncated)."""
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("no prompts to embed")
    device = torch.device(device or "cpu")
    max_len = int(clip.model.config.text_config.max_position_embeddings)
    enc = clip.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    emb = _features(clip.model.to(device).get_text_features(**{k: v.to(device) for k, v in enc.items()}))
    return torch.nn.functional.normalize(emb.float().cpu(), dim=-1)


def _features(x) -> torch.Tensor:
    """The projected embedding: a tensor (transformers 4) or the output's pooler_output (transformers 5)."""
    return x if isinstance(x, torch.Tensor) else x.pooler_output


def parse_prompts(text: str, batch: int) -> list[str]:
    """One prompt per image: one line for every image, or exactly one line per image (blank lines ignored)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        raise ValueError("prompt is empty: give the text the images should show (one line for all images, or one "
                         "line per image)")
    if len(lines) == 1:
        return lines * batch
    if len(lines) != batch:
        raise ValueError(f"{len(lines)} prompt lines for {batch} images: give one line for all images or exactly one "
                         f"line per image")
    return lines


def clip_scores(cosines: Sequence[float]) -> list[float]:
    """100 * max(cos, 0) per image (the field's CLIP score)."""
    return [100.0 * max(float(c), 0.0) for c in cosines]


def score_record(cosines: Sequence[float], prompts: Sequence[str]) -> dict:
    """Per-image cosines and CLIP scores, and their mean with a bootstrap 95 % interval (stats.mean_record)."""
    if not len(cosines):
        raise ValueError("no images: a CLIP score needs at least one image")
    s = clip_scores(cosines)
    mean = stats.mean_record(s)
    mean["convention"] = CLIP_SCORE
    return {"images": [{"index": i, "prompt": p, "cosine": float(c), "clip_score": v}
                       for i, (p, c, v) in enumerate(zip(prompts, cosines, s))],
            "mean": mean, "rule": "CLIP score = 100 * max(cosine(image embedding, text embedding), 0)"}


def clip_score(clip: Clip, images: torch.Tensor, prompt_text: str, device=None) -> dict:
    """The record of a CLIP score: per image its prompt, cosine and score; the mean with its interval."""
    prompts = parse_prompts(prompt_text, to_uint8(images).shape[0])
    img = image_embeddings(clip, images, device)
    uniq = list(dict.fromkeys(prompts))
    txt = text_embeddings(clip, uniq, device)
    cos = [float(img[i] @ txt[uniq.index(p)]) for i, p in enumerate(prompts)]
    return clip_record(cos, prompts, clip.describe())


def clip_record(cosines: Sequence[float], prompts: Sequence[str], detector=None) -> dict:
    """The CLIP score record from per-image cosines. No score-record "schema": a mean has no counting convention to
    rescore (memora-batch rescore passes it by); the raw cosines are kept all the same."""
    return {"kind": "clip-score", "detector": detector or {}, "convention": CLIP_SCORE,
            **score_record(cosines, prompts)}


def parse_artists(text: str) -> list[str]:
    names = [t.strip() for t in str(text).replace("\n", ",").replace(";", ",").split(",")]
    return list(dict.fromkeys(n for n in names if n))


def style_prompts(target: str, others: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """[template(target), template(other) ...]; ValueError for an empty target, no others, or a template without
    one '{}'."""
    target = str(target).strip()
    if not target:
        raise ValueError("target artist is empty (e.g. 'Van Gogh')")
    if str(template).count("{}") != 1:
        raise ValueError(f"style template must contain exactly one '{{}}' where the artist's name goes, got "
                         f"{template!r}")
    rest = [o for o in others if o.lower() != target.lower()]
    if not rest:
        raise ValueError("no other artists to compare the target with: give at least one (comma-separated)")
    return [template.format(a) for a in [target, *rest]]


def zero_shot_images(cosines: Sequence[Sequence[float]]) -> list[dict]:
    """Per image: the cosine with every prompt (prompt order) and the prompts ranked by it (``topk``, best first;
    ``topk_scores``: their cosines), the score-record layout of a classifier."""
    c = np.asarray(cosines, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] < 2:
        raise ValueError(f"cosines must be [images, prompts] with at least one image and two prompts, got {c.shape}")
    order = np.argsort(-c, axis=1, kind="stable")
    return [{"index": i, "cosines": [float(v) for v in c[i]], "topk": [int(j) for j in order[i]],
             "topk_scores": [float(c[i, j]) for j in order[i]]} for i in range(c.shape[0])]


def zero_shot_rate(cosines: Sequence[Sequence[float]], target: int = 0) -> dict:
    """Rate record (convention clip-zeroshot-style) of images whose most similar prompt is prompt ``target``."""
    return conventions.classifier_images_record("clip-zeroshot", zero_shot_images(cosines), [target], ZERO_SHOT,
                                                {})["rate"]


def style_score(clip: Clip, images: torch.Tensor, target: str, others: Sequence[str],
                template: str = DEFAULT_TEMPLATE, device=None) -> dict:
    """The score record of the zero-shot style rate (kind clip-zeroshot; the prompts are its classes, the target's
    is class 0)."""
    prompts = style_prompts(target, others, template)
    cos = (image_embeddings(clip, images, device) @ text_embeddings(clip, prompts, device).T).tolist()
    return style_record(cos, target, others, template, clip.describe())


def style_record(cosines: Sequence[Sequence[float]], target: str, others: Sequence[str],
                 template: str = DEFAULT_TEMPLATE, detector=None) -> dict:
    """The zero-shot style score record from the cosines [images, prompts] of the images with
    ``style_prompts(target, others, template)`` (what :func:`style_score` computes with the model)."""
    prompts = style_prompts(target, others, template)
    per = zero_shot_images(cosines)
    if len(per[0]["cosines"]) != len(prompts):
        raise ValueError(f"{len(per[0]['cosines'])} cosines per image for {len(prompts)} prompts")
    for im in per:
        im["best_prompt"] = prompts[im["topk"][0]]
    rec = conventions.classifier_images_record("clip-zeroshot", per, [0], ZERO_SHOT, detector or {}, [prompts[0]],
                                               reported=(ZERO_SHOT,))
    rec.update({"target_artist": str(target).strip(), "template": template, "prompts": prompts})
    return rec


def style_tables(rec: dict) -> list[dict]:
    """The tables the zero-shot style node publishes: the summary (one row, carrying the record) and the images (the
    text of each image's most similar prompt, its cosine and the target prompt's)."""
    return [{"title": "Style score (CLIP zero-shot)", "columns": conventions.RATE_COLUMNS,
             "rows": [conventions.rate_row(rec["rate"])], "record": rec},
            {"title": "Style score per image", "columns": ["image", "best_prompt", "best_cosine", "target_cosine"],
             "rows": [[im["index"], rec["prompts"][im["topk"][0]], im["topk_scores"][0], im["cosines"][0]]
                      for im in rec["images"]]}]


def clip_tables(rec: dict) -> list[dict]:
    """The tables the CLIP score node publishes: the mean (one row, carrying the record: no "schema", so memora-batch
    rescore passes it by) and the images."""
    m = rec["mean"]
    return [{"title": "CLIP score", "columns": MEAN_COLUMNS,
             "rows": [[m["mean"], m["n"], m["ci_low"], m["ci_high"], m["convention"]]], "record": rec},
            {"title": "CLIP score per image", "columns": ["image", "clip_score", "cosine"],
             "rows": [[im["index"], im["clip_score"], im["cosine"]] for im in rec["images"]]}]


def to_json(rec: dict) -> str:
    return json.dumps(rec, indent=2)
