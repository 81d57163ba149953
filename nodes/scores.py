"""Score nodes for object- and style-erased models: ImageNet ResNet-50 object score, CLIP score, zero-shot style
rate, style-classifier rate. The measurements live in ``memora.evaluation.objects`` / ``clip_score`` (no ComfyUI);
these nodes find the weights in ComfyUI's model folders, save the JSON record and publish the tables.

Weights are local files only (nothing is downloaded):

* ``models/classifiers`` (ComfyUI's ``classifiers`` folder; registered here if a ComfyUI lacks it): torchvision's
  ``resnet50-0676ba61.pth`` / ``resnet50-11ad3fa6.pth`` (or .safetensors conversions), and transformers
  image-classification folders (``microsoft/resnet-50``; an artist classifier such as UnlearnDiffAtk's ViT);
* ``models/clip_vision``, ``models/clip`` or ``models/text_encoders``: transformers CLIPModel folders (both towers,
  e.g. ``openai/clip-vit-large-patch14``)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from comfy_api.latest import io

import comfy.model_management
import folder_paths

from memora.evaluation import clip_score, objects
from . import _host, _schema
from .evaluation import save_json_record

CLASSIFIER_FOLDER = "classifiers"
CLIP_FOLDERS = ("clip_vision", "text_encoders")   # text_encoders covers models/clip too
AUTO = "auto"
_SEARCH_DEPTH = 3


def register_folder() -> None:
    """models/classifiers as a ComfyUI model folder (ComfyUI 0.3.x declares it; older ones may not)."""
    if CLASSIFIER_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[CLASSIFIER_FOLDER] = (
            [os.path.join(folder_paths.models_dir, CLASSIFIER_FOLDER)], {""})


register_folder()


# -- finding the weights -------------------------------------------------------------------------------------------
def _model_dirs(root: Path, want=lambda cfg: True) -> list[str]:
    """Folders under ``root`` (up to 3 deep) holding a transformers config.json that ``want`` accepts, as
    'relative/path/'."""
    out: list[str] = []
    stack = [(root, 0)] if root.is_dir() else []
    while stack:
        d, depth = stack.pop()
        try:
            subdirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
        for p in subdirs:
            cfg = p / "config.json"
            if cfg.is_file():
                try:
                    ok = want(json.loads(cfg.read_text(encoding="utf-8")))
                except (OSError, ValueError):
                    ok = False
                if ok:
                    out.append(p.relative_to(root).as_posix() + "/")
            elif depth + 1 < _SEARCH_DEPTH:
                stack.append((p, depth + 1))
    return sorted(out)


def _weight_files(root: Path) -> list[str]:
    """State-dict files under ``root`` (up to 3 deep) that are not the weights of a transformers folder."""
    out: list[str] = []
    stack = [(root, 0)] if root.is_dir() else []
    while stack:
        d, depth = stack.pop()
        try:
            entries = sorted(d.iterdir())
        except OSError:
            continue
        if (d / "config.json").is_file():
            continue
        for p in entries:
            if p.is_file() and p.name.lower().endswith(objects.WEIGHT_SUFFIXES):
                out.append(p.relative_to(root).as_posix())
            elif p.is_dir() and not p.name.startswith(".") and depth + 1 < _SEARCH_DEPTH:
                stack.append((p, depth + 1))
    return out


def classifier_choices() -> list[str]:
    """'auto', the state-dict files of models/classifiers, and its transformers folders ('name/'). The folder is
    scanned here (ComfyUI's own listing of 'classifiers' filters by extension differently across versions)."""
    roots = _host.model_folder_roots(CLASSIFIER_FOLDER)
    files = {f for r in roots for f in _weight_files(r)}
    dirs = {d for r in roots for d in _model_dirs(r)}
    return [AUTO] + sorted(files) + sorted(dirs)


def _expected_text() -> str:
    roots = ", ".join(str(r) for r in _host.model_folder_roots(CLASSIFIER_FOLDER))
    return (f"Place one of these in {roots}: " + "; ".join(objects.EXPECTED_FILES)
            + " (docs/evaluation.md: 'Weights').")


def resolve_classifier(choice: str) -> Path:
    """The file or folder a list entry names ('auto': the first expected ResNet-50 file or folder found)."""
    roots = _host.model_folder_roots(CLASSIFIER_FOLDER)
    if choice == AUTO:
        for name in objects.EXPECTED_FILES[:4]:
            for r in roots:
                if (r / name).is_file():
                    return r / name
        for r in roots:
            for d in _model_dirs(r, lambda cfg: cfg.get("model_type") == "resnet"):
                return r / d
        raise FileNotFoundError(f"no ImageNet ResNet-50 classifier found. {_expected_text()}")
    parts = [p for p in str(choice).replace("\\", "/").split("/") if p]
    if not parts or any(p in ("..", ".") for p in parts) or os.path.isabs(str(choice)):
        raise ValueError(f"classifier: {choice!r} is not a plain path inside the classifiers folder")
    for r in roots:
        cand = r.joinpath(*parts)
        if (cand.is_dir() if str(choice).endswith("/") else cand.is_file()):
            return cand
    raise FileNotFoundError(f"classifier {choice!r} not found. {_expected_text()}")


def clip_choices() -> list[str]:
    """'auto' and the transformers CLIPModel folders of models/clip_vision, models/clip and models/text_encoders,
    as '<folder>/<dir>/'."""
    out = []
    for folder in CLIP_FOLDERS:
        for r in _host.model_folder_roots(folder):
            out.extend(f"{r.name}/{d}" for d in _model_dirs(r, lambda cfg: cfg.get("model_type") == "clip"))
    return [AUTO] + sorted(dict.fromkeys(out))


def _clip_roots() -> list[Path]:
    return [r for f in CLIP_FOLDERS for r in _host.model_folder_roots(f)]


def resolve_clip(choice: str) -> Path:
    found = clip_choices()[1:]
    where = ", ".join(str(r) for r in _clip_roots())
    need = ("a transformers CLIPModel folder with both towers (e.g. openai/clip-vit-large-patch14: config.json, "
            "model.safetensors, vocab.json, merges.txt, preprocessor_config.json), placed as a sub-folder of one of: "
            f"{where}. ComfyUI's CLIP Vision files (image tower only) cannot score text")
    if choice == AUTO:
        large = [c for c in found if "clip-vit-large-patch14" in c.lower()]
        if large or len(found) == 1:
            choice = (large or found)[0]
        elif not found:
            raise FileNotFoundError(f"no CLIP model found: the CLIP scores need {need}")
        else:
            raise ValueError(f"several CLIP models and none named clip-vit-large-patch14: choose one of {found}")
    label, _, rest = str(choice).partition("/")
    parts = [p for p in rest.split("/") if p]
    if not parts or any(p in ("..", ".") for p in parts):
        raise ValueError(f"clip_model: {choice!r} is not '<folder>/<model folder>/' as the list shows it")
    for r in _clip_roots():
        if r.name == label and r.joinpath(*parts).is_dir():
            return r.joinpath(*parts)
    raise FileNotFoundError(f"CLIP model {choice!r} not found: the CLIP scores need {need}")


# -- loading once ---------------------------------------------------------------------------------------------------
_CACHE: dict = {}
_LOCK = threading.Lock()


def _cached(kind: str, path: Path, load):
    """The model loaded from ``path``, kept (one per kind) until the file changes."""
    try:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        key = (str(path), tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    except OSError:
        key = (str(path), None)
    with _LOCK:
        hit = _CACHE.get(kind)
        if hit and hit[0] == key:
            return hit[1]
        obj = load(path)
        _CACHE[kind] = (key, obj)
        return obj


def _device():
    return comfy.model_management.get_torch_device()


def _rel(path: Path) -> str:
    return os.path.relpath(path, folder_paths.get_output_directory())


def _prefix_input(default: str):
    return io.String.Input("filename_prefix", default=default,
                           tooltip="Name of the JSON record in the output folder (ComfyUI's counter naming).")


# -- object score --------------------------------------------------------------------------------------------------
class MemoRaObjectScore(_schema.MemoRaNode):
    """The field's score for erased objects (ESD, UnlearnDiffAtk): an ImageNet ResNet-50 classifies every image;
    the rate is the share whose top-1 class (resnet50-top1) or top-5 classes (resnet50-top5) contain the target class
    (church 497, garbage truck 569, parachute 701, tench 0, or any of the 1,000 by index or name). Weights from
    models/classifiers: torchvision's resnet50-0676ba61.pth (or resnet50-11ad3fa6.pth, or .safetensors
    conversions) or the transformers microsoft/resnet-50 folder; nothing is downloaded. Each rate comes with n and
    a Wilson 95% interval; every image's top-5 classes and logits are saved as JSON, so any top-k rate can be
    recomputed without the model."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa Object Score (ResNet-50)", "evaluation", is_output_node=True, inputs=[
            _schema.images_input("images", "Images to score (e.g. the recovered model's outputs for the object)."),
            io.Combo.Input("classifier", options=classifier_choices(), default=AUTO,
                           tooltip="ImageNet ResNet-50 weights in models/classifiers: 'auto' takes the first of "
                                   "resnet50-0676ba61.pth, resnet50-11ad3fa6.pth (.safetensors too), then a "
                                   "transformers ResNet folder (microsoft/resnet-50)."),
            io.String.Input("target_class", default="church",
                            tooltip="ImageNet class: an index 0..999 or a name (ESD: church 497, garbage truck 569, "
                                    "parachute 701, tench 0)."),
            io.Combo.Input("convention", options=[objects.TOP1, objects.TOP5], default=objects.TOP1,
                           tooltip="Which rate is the node's summary (both are computed and saved): the target is "
                                   "the top-1 class (ESD) or among the top 5."),
            _prefix_input("memora/object"),
        ], outputs=[
            io.Float.Output(display_name="rate", tooltip="Share of images counted under the chosen convention."),
            io.Float.Output(display_name="top1_rate", tooltip="Share of images whose top-1 class is the target."),
            io.Float.Output(display_name="top5_rate", tooltip="Share of images with the target among the top 5."),
            _schema.report_output("Rates with n and 95% intervals, per-image top-1 class and target rank, JSON path."),
        ])

    @classmethod
    def execute(cls, images, classifier, target_class, convention, filename_prefix) -> io.NodeOutput:
        objects.to_uint8(images)       # the batch checked before any loading
        objects.resolve_class(target_class)          # a wrong name fails before any loading
        path = resolve_classifier(classifier)
        clf = _cached("imagenet", path, objects.load_classifier)
        try:
            rec = objects.score(clf, images, target_class, convention, device=_device())
        finally:
            clf.model.to("cpu")
        saved = save_json_record(filename_prefix, json.dumps(rec, indent=2))
        report = objects.report(rec) + f"\nJSON record: {_rel(saved)}"
        tables = objects.tables("Object score (ResNet-50)", rec)
        r = rec["rates"]
        return io.NodeOutput(rec["rate"]["rate"], r[objects.TOP1]["rate"], r[objects.TOP5]["rate"], report,
                             ui=_host.publish_scores(tables))


# -- CLIP score ----------------------------------------------------------------------------------------------------
def _clip_input():
    return io.Combo.Input("clip_model", options=clip_choices(), default=AUTO,
                          tooltip="A transformers CLIPModel folder (both towers; e.g. openai/clip-vit-large-patch14) "
                                  "in models/clip_vision, models/clip or models/text_encoders; 'auto' prefers "
                                  "clip-vit-large-patch14.")


class MemoRaClipScore(_schema.MemoRaNode):
    """CLIP score (Hessel et al. 2021), the field's image-text alignment metric: 100 x the cosine similarity of CLIP's
    image and text embeddings (negative values count as 0), per image and as a mean with a bootstrap 95% interval.
    Needs a full transformers CLIPModel folder (ViT-L/14 by default: openai/clip-vit-large-patch14) in
    models/clip_vision, models/clip or models/text_encoders; ComfyUI's CLIP Vision files hold only the image tower.
    Every cosine is saved as JSON."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa CLIP Score", "evaluation", is_output_node=True, inputs=[
            _schema.images_input("images", "Images to score."),
            _clip_input(),
            io.String.Input("prompt", multiline=True, default="a photo of a church",
                            tooltip="The text the images should show: one line for every image, or one line per "
                                    "image."),
            _prefix_input("memora/clip_score"),
        ], outputs=[
            io.Float.Output(display_name="clip_score", tooltip="Mean CLIP score over the images (0..100)."),
            _schema.report_output("Mean with n and 95% interval, per-image scores, JSON path."),
        ])

    @classmethod
    def execute(cls, images, clip_model, prompt, filename_prefix) -> io.NodeOutput:
        objects.to_uint8(images)       # the batch checked before any loading
        clip_score.parse_prompts(prompt, images.shape[0])
        model = _cached("clip", resolve_clip(clip_model), clip_score.load_clip)
        try:
            rec = clip_score.clip_score(model, images, prompt, device=_device())
        finally:
            model.model.to("cpu")
        saved = save_json_record(filename_prefix, clip_score.to_json(rec))
        m = rec["mean"]
        report = "\n".join([f"CLIP score ({model.name}): {clip_score.stats.format_mean(m, 2)}; {m['convention']}"]
                           + [f"  image {im['index']}: {im['clip_score']:.2f} (cosine {im['cosine']:.4f})"
                              for im in rec["images"]] + [f"JSON record: {_rel(saved)}"])
        return io.NodeOutput(m["mean"], report, ui=_host.publish_scores(clip_score.clip_tables(rec)))


# -- style rates ---------------------------------------------------------------------------------------------------
class MemoRaStyleScore(_schema.MemoRaNode):
    """Zero-shot style rate with CLIP: each image is compared with 'a painting in the style of <artist>' for the
    target artist and every other artist of a list (default: ESD's artists, docs/evaluation.md); an image counts
    when the target's prompt is the most similar. The rate comes with n and a Wilson 95% interval
    (clip-zeroshot-style); every image's cosines are saved as JSON. Needs a full transformers CLIPModel folder (as
    MemoRa CLIP Score)."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa Style Score (CLIP zero-shot)", "evaluation", is_output_node=True, inputs=[
            _schema.images_input("images", "Images to score (e.g. the recovered model's outputs for the style)."),
            _clip_input(),
            io.String.Input("target_artist", default=clip_score.DEFAULT_TARGET,
                            tooltip="The erased style's artist."),
            io.String.Input("other_artists", multiline=True, default=", ".join(clip_score.DEFAULT_OTHERS),
                            tooltip="The artists the target competes with, comma-separated."),
            io.String.Input("template", default=clip_score.DEFAULT_TEMPLATE,
                            tooltip="The prompt for each artist; '{}' is replaced by the name."),
            _prefix_input("memora/style"),
        ], outputs=[
            io.Float.Output(display_name="rate", tooltip="Share of images whose best-matching prompt is the target."),
            _schema.report_output("Rate with n and 95% interval, per-image best prompt, JSON path."),
        ])

    @classmethod
    def execute(cls, images, clip_model, target_artist, other_artists, template, filename_prefix) -> io.NodeOutput:
        objects.to_uint8(images)       # the batch checked before any loading
        others = clip_score.parse_artists(other_artists)
        clip_score.style_prompts(target_artist, others, template)
        model = _cached("clip", resolve_clip(clip_model), clip_score.load_clip)
        try:
            rec = clip_score.style_score(model, images, target_artist, others, template, device=_device())
        finally:
            model.model.to("cpu")
        saved = save_json_record(filename_prefix, clip_score.to_json(rec))
        r = rec["rate"]
        lines = [f"Style score ({model.name}), target '{rec['prompts'][0]}' against {len(rec['prompts']) - 1} "
                 f"other artists: {clip_score.stats.format_rate(r)}"]
        lines += [f"  image {im['index']}: best '{im['best_prompt']}' (cosine {im['topk_scores'][0]:.4f}; target "
                  f"{im['cosines'][0]:.4f})" for im in rec["images"]]
        return io.NodeOutput(r["rate"], "\n".join(lines + [f"JSON record: {_rel(saved)}"]),
                             ui=_host.publish_scores(clip_score.style_tables(rec)))


class MemoRaStyleClassifierScore(_schema.MemoRaNode):
    """Style rate with a trained artist classifier (UnlearnDiffAtk's ViT artist classifier, or any transformers
    image-classification folder in models/classifiers whose labels name artists): the share of images whose top-1
    (artist-top1), top-3 (artist-top3, UnlearnDiffAtk's second rate) or top-5 (artist-top5) classes contain the target
    label, with n and Wilson 95% intervals. Every
    image's top-5 labels and logits are saved as JSON."""

    @classmethod
    def define_schema(cls):
        folders = [c for c in classifier_choices() if c.endswith("/")]
        return _schema.node(cls, "MemoRa Style Score (classifier)", "evaluation", is_output_node=True, inputs=[
            _schema.images_input("images", "Images to score."),
            io.Combo.Input("classifier", options=folders or [""],
                           tooltip="A transformers image-classification folder in models/classifiers (config.json "
                                   "with the artist labels, model.safetensors or pytorch_model.bin)."),
            io.String.Input("target_label", default="vincent-van-gogh",
                            tooltip="The target artist's label in the classifier (case, '-', '_' and spaces "
                                    "ignored), or its index."),
            io.Combo.Input("convention", options=list(objects.ARTIST_CONVENTIONS),
                           default=objects.ARTIST_TOP1, tooltip="Which rate is the node's summary."),
            _prefix_input("memora/style_classifier"),
        ], outputs=[
            io.Float.Output(display_name="rate", tooltip="Share of images counted under the chosen convention."),
            _schema.report_output("Rates with n and 95% intervals, per-image top-1 label, JSON path."),
        ])

    @classmethod
    def execute(cls, images, classifier, target_label, convention, filename_prefix) -> io.NodeOutput:
        objects.to_uint8(images)       # the batch checked before any loading
        if not classifier or not str(classifier).endswith("/"):
            raise FileNotFoundError(f"style classifier: choose a transformers image-classification folder in "
                                    f"models/classifiers ({', '.join(str(r) for r in _host.model_folder_roots(CLASSIFIER_FOLDER))}), "
                                    f"got {classifier!r}")
        path = resolve_classifier(classifier)
        clf = _cached("style", path, lambda p: objects.load_transformers(p, num_classes=None))
        try:
            rec = objects.label_score(clf, images, target_label, convention, device=_device())
        finally:
            clf.model.to("cpu")
        saved = save_json_record(filename_prefix, json.dumps(rec, indent=2))
        return io.NodeOutput(rec["rate"]["rate"], objects.report(rec) + f"\nJSON record: {_rel(saved)}",
                             ui=_host.publish_scores(objects.tables("Style score (classifier)", rec)))


NODES = [MemoRaObjectScore, MemoRaClipScore, MemoRaStyleScore, MemoRaStyleClassifierScore]
