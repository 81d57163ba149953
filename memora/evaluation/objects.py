"""Object scores: the field's convention for erased objects, an ImageNet ResNet-50's top-1 / top-5 rate of a class.

ESD (Gandikota et al. 2023, "Erasing Concepts from Diffusion Models") scores an erased object by classifying the
edited model's images with an ImageNet ResNet-50 and counting the images whose top-1 prediction is the erased class
(church 497, garbage truck 569, parachute 701, tench 0, ...); UnlearnDiffAtk scores object attacks the same way with
the transformers ``microsoft/resnet-50`` model. Here:

* ``resnet50-top1``: share of images whose highest logit is the target class;
* ``resnet50-top5``: share of images with the target class among the 5 highest logits.

Every image's top-5 class indices and logits, the target's logit and its rank among the 1,000 are kept, so both
rates (and a top-k rate for any k) can be recomputed from the stored record without the model
(:func:`rates_from_images`).

Weights are read from local files only (nothing is downloaded):

* torchvision's ResNet-50 state dicts ``resnet50-0676ba61.pth`` (IMAGENET1K_V1) and ``resnet50-11ad3fa6.pth``
  (IMAGENET1K_V2), or the same tensors converted to ``.safetensors``: loaded into ``torchvision.models.resnet50``
  and preprocessed by that weight set's own torchvision transform (V1: resize the shorter side to 256, center crop
  224; V2: resize 232, crop 224; bilinear with antialiasing; ImageNet mean / std). A file named otherwise gets V1's.
* a transformers image-classification folder (``microsoft/resnet-50``: ``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``, with ``preprocessor_config.json`` when present): loaded with transformers and preprocessed by
  its own image processor (``microsoft/resnet-50``: resize 256 bicubic, center crop 224, ImageNet mean / std; the
  same processor in code when the folder has no ``preprocessor_config.json``).

Images reach the classifier as 8-bit RGB, as a PNG written by ComfyUI's SaveImage would give them (the field scores
saved files)."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import conventions, stats

# Convention names: defined, with their rules and sources, in memora.evaluation.conventions.CONVENTIONS.
TOP1 = "resnet50-top1"
TOP5 = "resnet50-top5"
TOPK = 5
# ESD's object classes (ImageNet-1k indices).
ESD_CLASSES = {"church": 497, "garbage truck": 569, "parachute": 701, "tench": 0}
# torchvision's file names (the hash part of the published URLs) -> the weight set they hold.
TORCHVISION_FILES = {"resnet50-0676ba61": "IMAGENET1K_V1", "resnet50-11ad3fa6": "IMAGENET1K_V2"}
EXPECTED_FILES = ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth", "resnet50-0676ba61.safetensors",
                  "resnet50-11ad3fa6.safetensors", "microsoft-resnet-50/ (a transformers folder: config.json + "
                  "model.safetensors or pytorch_model.bin)")
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClassifierFileError(ValueError):
    """A classifier file or folder that is missing or is not what it claims to be."""


# -- the 1,000 classes ---------------------------------------------------------------------------------------------
def imagenet_classes() -> list[str]:
    """ImageNet-1k class names in index order (torchvision's weights metadata, part of the torchvision package)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def resolve_class(spec) -> tuple[int, str]:
    """(index, name) of an ImageNet class given as an index (0..999, int or digits) or a name (case-insensitive,
    '_' for ' ' allowed). ValueError naming the nearest names for an unknown one, the indices for an ambiguous one."""
    names = imagenet_classes()
    if isinstance(spec, bool):
        raise ValueError(f"ImageNet class must be an index 0..999 or a class name, got {spec!r}")
    text = str(spec).strip()
    if isinstance(spec, int) or text.isdigit():
        i = int(text)
        if not 0 <= i < len(names):
            raise ValueError(f"ImageNet class index must be 0..{len(names) - 1}, got {i}")
        return i, names[i]
    key = " ".join(text.replace("_", " ").lower().split())
    if not key:
        raise ValueError("ImageNet class is empty: give an index 0..999 or a class name (e.g. 'church', "
                         "'garbage truck', 'parachute', 'tench')")
    hits = [i for i, n in enumerate(names) if n.lower() == key]
    if len(hits) > 1:
        raise ValueError(f"ImageNet class name {text!r} is ambiguous: it names classes {hits}; give the index")
    if not hits:
        near = difflib.get_close_matches(key, [n.lower() for n in names], n=3, cutoff=0.5)
        hint = f"; nearest: {', '.join(repr(n) for n in near)}" if near else ""
        raise ValueError(f"unknown ImageNet class {text!r}{hint} (or give an index 0..999)")
    return hits[0], names[hits[0]]


# -- the classifier ------------------------------------------------------------------------------------------------
@dataclass
class Classifier:
    model: torch.nn.Module                      # images [B, 3, h, w] -> logits [B, classes]
    preprocess: Callable[[np.ndarray], torch.Tensor]   # uint8 [B, H, W, 3] -> model input
    source: str                                  # "torchvision" | "transformers"
    weights: str                                 # file or folder name
    preprocessing: str                           # in words, for the record
    num_classes: int

    def describe(self) -> dict:
        return {"source": self.source, "weights": self.weights, "preprocessing": self.preprocessing,
                "architecture": "ResNet-50" if self.source == "torchvision" else self.model.config.model_type}


def read_state_dict(path: Path) -> dict:
    """Tensors of a .pth/.pt/.bin (torch.load, weights only) or .safetensors file; ClassifierFileError if unreadable."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ClassifierFileError(f"could not read {path.name} as a weights file ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ClassifierFileError(f"{path.name} does not hold a state dict (a mapping of names to tensors)")
    return sd


def _check_keys(name: str, sd: dict, model: torch.nn.Module, what: str) -> None:
    want = model.state_dict()
    # BatchNorm's num_batches_tracked is absent from older torchvision files; torch fills it in on loading
    missing = [k for k in want if k not in sd and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in sd if k not in want]
    shapes = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} tensors of the wrong shape (e.g. {k}: {tuple(sd[k].shape)}, expected "
                         f"{tuple(want[k].shape)})")
        raise ClassifierFileError(f"{name} is not {what}: " + "; ".join(parts))


def load_torchvision(path) -> Classifier:
    """torchvision ResNet-50 from a state dict file; preprocessing of the weight set its file name names."""
    from torchvision.models import ResNet50_Weights, resnet50

    path = Path(path)
    if not path.is_file():
        raise ClassifierFileError(f"no classifier file {path}")
    sd = read_state_dict(path)
    model = resnet50(weights=None)
    _check_keys(path.name, sd, model, "a torchvision ResNet-50 state dict (ImageNet, 1000 classes)")
    model.load_state_dict(sd)
    model.eval()
    weight_set = TORCHVISION_FILES.get(path.stem, "IMAGENET1K_V1")
    tf = getattr(ResNet50_Weights, weight_set).transforms()
    text = (f"{weight_set} transform: resize shorter side to {tf.resize_size[0]} (bilinear, antialias), center crop "
            f"{tf.crop_size[0]}, ImageNet mean {list(tf.mean)} / std {list(tf.std)}")

    def preprocess(batch: np.ndarray) -> torch.Tensor:
        return tf(torch.from_numpy(batch).permute(0, 3, 1, 2))

    return Classifier(model, preprocess, "torchvision", path.name, text, 1000)


def _hf_processor(folder: Path):
    from transformers import AutoImageProcessor, ConvNextImageProcessor

    if (folder / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    # microsoft/resnet-50's own settings: shortest edge 224 / crop_pct 0.875 = 256, bicubic, crop 224
    return ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, resample=3,
                                  image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def read_hf_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ClassifierFileError(f"{folder.name}/ has no config.json: a transformers model folder holds config.json "
                                  f"and {' or '.join(HF_WEIGHTS)}")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ClassifierFileError(f"{folder.name}/config.json is not readable JSON ({e})") from e
    if not any((folder / w).is_file() for w in HF_WEIGHTS):
        raise ClassifierFileError(f"{folder.name}/ has config.json but no weights: expected {' or '.join(HF_WEIGHTS)}")
    return data


#: what makes a transformers ResNet a ResNet-50 (microsoft/resnet-50's config.json): stage depths and block type
RESNET50_DEPTHS = [3, 4, 6, 3]


def check_resnet50_config(folder: Path, cfg: dict) -> None:
    """Refuse a transformers folder that is not a ResNet-50 (an object score's rates are defined on ResNet-50's
    predictions): model_type 'resnet', depths [3, 4, 6, 3], bottleneck blocks. The error names what was found."""
    found = (cfg.get("model_type"), cfg.get("depths"), cfg.get("layer_type"))
    if found != ("resnet", RESNET50_DEPTHS, "bottleneck"):
        raise ClassifierFileError(
            f"{folder.name}/ is not a ResNet-50: its config.json has model_type {found[0]!r}, depths {found[1]!r}, "
            f"layer_type {found[2]!r}; a ResNet-50 (microsoft/resnet-50) has model_type 'resnet', depths "
            f"{RESNET50_DEPTHS} and layer_type 'bottleneck'. The object score's conventions (resnet50-top1/top5) are "
            f"defined on ResNet-50's predictions")


def load_transformers(folder, num_classes: Optional[int] = 1000) -> Classifier:
    """A transformers image-classification folder (microsoft/resnet-50, or a ViT artist classifier with
    num_classes=None), loaded from local files only."""
    from transformers import AutoModelForImageClassification

    folder = Path(folder)
    cfg = read_hf_config(folder)
    if num_classes == 1000:
        check_resnet50_config(folder, cfg)
    try:
        model = AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ClassifierFileError(f"{folder.name}/ could not be loaded as a transformers image classifier "
                                  f"(model_type {cfg.get('model_type')!r}): {type(e).__name__}: {e}") from e
    n = int(model.config.num_labels)
    if num_classes is not None and n != num_classes:
        raise ClassifierFileError(f"{folder.name}/ classifies into {n} classes, not the {num_classes} ImageNet "
                                  f"classes an object score needs")
    model.eval()
    proc = _hf_processor(folder)
    text = f"{type(proc).__name__} of the folder: " + json.dumps(
        {k: v for k, v in proc.to_dict().items() if k in ("size", "crop_size", "crop_pct", "resample",
                                                          "image_mean", "image_std", "do_center_crop")})

    def preprocess(batch: np.ndarray) -> torch.Tensor:
        return proc(images=list(batch), return_tensors="pt")["pixel_values"]

    return Classifier(model, preprocess, "transformers", folder.name + "/", text, n)


def load_classifier(path, num_classes: Optional[int] = 1000) -> Classifier:
    path = Path(path)
    if path.is_dir():
        return load_transformers(path, num_classes)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ClassifierFileError(f"{path.name}: expected a {'/'.join(WEIGHT_SUFFIXES)} state dict file or a "
                                  f"transformers folder")
    return load_torchvision(path)


# -- running it ----------------------------------------------------------------------------------------------------
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """A ComfyUI IMAGE batch [B, H, W, C] (0..1) -> uint8 RGB [B, H, W, 3], as SaveImage writes it (truncating)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected an IMAGE batch [batch, height, width, channels], got {got}")
    if images.shape[0] == 0:
        raise ValueError("the image batch is empty: nothing to score")
    c = images.shape[-1]
    if c not in (1, 3, 4):
        raise ValueError(f"expected 1, 3 or 4 channels (last dimension), got {c} (shape {tuple(images.shape)})")
    if min(images.shape[1], images.shape[2]) < 8:
        raise ValueError(f"images of {images.shape[2]}x{images.shape[1]} px are too small to classify (at least 8 px)")
    x = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("the images contain NaN or infinite values")
    x = x.expand(*x.shape[:-1], 3) if c == 1 else x[..., :3]
    return np.clip(255.0 * x.numpy(), 0, 255).astype(np.uint8)


@torch.inference_mode()
def logits(clf: Classifier, images: torch.Tensor, device=None, batch_size: int = 8) -> torch.Tensor:
    """Logits [B, classes] (float32, CPU) of a ComfyUI IMAGE batch."""
    arr = to_uint8(images)
    device = torch.device(device or "cpu")
    model = clf.model.to(device)
    out = []
    for i in range(0, arr.shape[0], batch_size):
        x = clf.preprocess(arr[i:i + batch_size]).to(device, torch.float32)
        y = model(x)
        out.append((y.logits if hasattr(y, "logits") else y).float().cpu())
    return torch.cat(out)


def image_records(lg: torch.Tensor, target: int, k: int = TOPK) -> list[dict]:
    """Per image: top-k class indices and logits (highest first; ``topk`` / ``topk_scores``, the score-record
    layout), the target's logit and its rank among all classes (1 = highest; ties count against the target)."""
    if lg.dim() != 2 or lg.shape[0] == 0:
        raise ValueError(f"logits must be [images, classes] with at least one image, got {tuple(lg.shape)}")
    if not 0 <= target < lg.shape[1]:
        raise ValueError(f"target class {target} outside the classifier's {lg.shape[1]} classes")
    vals, idx = torch.topk(lg, min(k, lg.shape[1]), dim=1)
    return [{"index": i, "topk": [int(v) for v in idx[i]], "topk_scores": [float(v) for v in vals[i]],
             "target_logit": float(lg[i, target]), "target_rank": int((lg[i] >= lg[i, target]).sum())}
            for i in range(lg.shape[0])]


def rates_from_images(images: Sequence[dict], target: int) -> dict:
    """{'resnet50-top1': rate record, 'resnet50-top5': rate record} from stored per-image top-5 indices (counted by
    the conventions themselves, memora.evaluation.conventions)."""
    if not images:
        raise ValueError("no images: a rate needs at least one image")
    return conventions.classifier_images_record("imagenet", images, [target], TOP1, {}, reported=(TOP1, TOP5))["rates"]


def score(clf: Classifier, images: torch.Tensor, target, convention: str = TOP1, device=None) -> dict:
    """The JSON record of an object score: classifier, target class, per-image top-5, both rates."""
    index, _ = resolve_class(target)
    if clf.num_classes != 1000:
        raise ValueError(f"{clf.weights} has {clf.num_classes} classes, not ImageNet's 1000")
    return object_record(logits(clf, images, device), index, clf.describe(), convention)


def object_record(lg: torch.Tensor, target, detector: dict, convention: str = TOP1) -> dict:
    """The object score record from ImageNet logits [images, 1000] (what :func:`score` computes with the model)."""
    index, name = resolve_class(target)
    per = image_records(lg, index)
    names = imagenet_classes()
    for im in per:
        im["topk_names"] = [names[i] for i in im["topk"]]
    return conventions.classifier_images_record("imagenet", per, [index], convention, detector, [name],
                                                reported=(TOP1, TOP5))


# -- an artist (style) classifier: UnlearnDiffAtk's ViT, any transformers image classifier with named labels -------
ARTIST_TOP1 = "artist-top1"
ARTIST_TOP3 = "artist-top3"
ARTIST_TOP5 = "artist-top5"
ARTIST_CONVENTIONS = (ARTIST_TOP1, ARTIST_TOP3, ARTIST_TOP5)


def _label_key(text: str) -> str:
    return " ".join(str(text).replace("_", " ").replace("-", " ").lower().split())


def resolve_label(labels: Sequence[str], spec) -> tuple[int, str]:
    """(index, label) of a classifier's class given by index or by label (case, '-', '_' and spaces ignored);
    ValueError naming the nearest labels for an unknown one."""
    text = str(spec).strip()
    if text.isdigit():
        i = int(text)
        if not 0 <= i < len(labels):
            raise ValueError(f"class index must be 0..{len(labels) - 1}, got {i}")
        return i, labels[i]
    keys = [_label_key(lb) for lb in labels]
    key = _label_key(text)
    if key in keys:
        return keys.index(key), labels[keys.index(key)]
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    hint = f"; nearest: {', '.join(repr(labels[keys.index(n)]) for n in near)}" if near else ""
    raise ValueError(f"the classifier has no class {text!r}{hint} ({len(labels)} classes, e.g. "
                     f"{', '.join(repr(lb) for lb in labels[:5])})")


def classifier_labels(clf: Classifier) -> list[str]:
    cfg = getattr(clf.model, "config", None)
    id2label = getattr(cfg, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(clf.num_classes)]


def label_score(clf: Classifier, images: torch.Tensor, target, convention: str = ARTIST_TOP1, device=None) -> dict:
    """The score record of a style classifier (e.g. UnlearnDiffAtk's ViT artist classifier): share of images whose
    top-1 (top-5) class is the target label."""
    labels = classifier_labels(clf)
    resolve_label(labels, target)     # an unknown label fails before the model runs
    return label_record(logits(clf, images, device), labels, target, clf.describe(), convention)


def label_record(lg: torch.Tensor, labels: Sequence[str], target, detector: dict,
                 convention: str = ARTIST_TOP1) -> dict:
    """The style-classifier score record from the classifier's logits [images, classes] and its labels."""
    index, name = resolve_label(labels, target)
    per = image_records(lg, index)
    for im in per:
        im["topk_names"] = [labels[i] for i in im["topk"]]
    return conventions.classifier_images_record("style-classifier", per, [index], convention, detector, [name],
                                                reported=ARTIST_CONVENTIONS)


def tables(title: str, rec: dict) -> list[dict]:
    """The score tables a classifier node publishes (``memora_scores``): the summary (the chosen convention, one
    row, carrying the record: what memora-batch rescores), every convention it reports (rows named by convention),
    and the images."""
    cols = conventions.RATE_COLUMNS
    return [
        {"title": title, "columns": cols, "rows": [conventions.rate_row(rec["rate"])], "record": rec},
        {"title": f"{title}: conventions", "columns": ["convention"] + cols[:-1],
         "rows": [[c] + conventions.rate_row(r)[:-1] for c, r in rec["rates"].items()]},
        {"title": f"{title} per image", "columns": ["image", "top1", "top1_name", "target_rank"],
         "rows": [[im["index"], im["topk"][0], im["topk_names"][0], im["target_rank"]] for im in rec["images"]]},
    ]


def report(rec: dict) -> str:
    what = "ImageNet class" if rec["kind"] == "imagenet" else "class"
    lines = [f"{'Object' if rec['kind'] == 'imagenet' else 'Style classifier'} score: {what} {rec['targets'][0]} "
             f"'{rec['target_names'][0]}' ({rec['detector']['weights']})"]
    for conv, r in rec["rates"].items():
        lines.append(f"  {conv}: {stats.format_rate(r)}")
    for im in rec["images"]:
        lines.append(f"  image {im['index']}: top-1 {im['topk'][0]} '{im['topk_names'][0]}', target rank "
                     f"{im['target_rank']}")
    return "\n".join(lines)
