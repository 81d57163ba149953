"""Object, CLIP and style scores (memora.evaluation.objects / clip_score) on weights built in code: the files load in
the layouts the docs name, the numbers equal an independent computation, the rates follow from known logits, and
every wrong file or input is refused with a specific error."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

import score_models
from memora.evaluation import clip_score as cs
from memora.evaluation import conventions, objects, stats


# -- classes -------------------------------------------------------------------------------------------------------
def test_esd_classes_by_name_and_index():
    for name, index in objects.ESD_CLASSES.items():
        assert objects.resolve_class(name) == (index, name)
        assert objects.resolve_class(index) == (index, name)
        assert objects.resolve_class(str(index)) == (index, name)
    assert objects.resolve_class("  Garbage_Truck ") == (569, "garbage truck")
    assert len(objects.imagenet_classes()) == 1000


@pytest.mark.parametrize("spec, message", [
    ("churh", "unknown ImageNet class 'churh'; nearest: 'church'"),
    ("parachut", "nearest: 'parachute'"),
    ("1000", "index must be 0..999, got 1000"),
    ("", "ImageNet class is empty"),
    ("zzzzqqq", "unknown ImageNet class 'zzzzqqq' (or give an index 0..999)"),
])
def test_unknown_class_names_the_nearest(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        objects.resolve_class(spec)


# -- rates from known logits ---------------------------------------------------------------------------------------
def _logits_with_target_rank(ranks: list[int], target: int, classes: int = 1000) -> torch.Tensor:
    """Logits where the target class has the given rank (1 = highest) in each row."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for r in ranks:
        row = torch.randperm(classes, generator=g).float()    # distinct values 0..999
        order = torch.argsort(row, descending=True)
        j = int(order[r - 1])                                  # the class now at rank r
        row[[target, j]] = row[[j, target]]
        rows.append(row)
    return torch.stack(rows)


def test_rates_from_known_logits():
    lg = _logits_with_target_rank([1, 3, 5, 6, 1000, 1, 2], target=497)
    per = objects.image_records(lg, 497)
    assert [im["target_rank"] for im in per] == [1, 3, 5, 6, 1000, 1, 2]
    assert all(im["topk_scores"] == sorted(im["topk_scores"], reverse=True) for im in per)
    rates = objects.rates_from_images(per, 497)
    top1, top5 = rates[objects.TOP1], rates[objects.TOP5]
    assert (top1["k"], top1["n"], top5["k"], top5["n"]) == (2, 7, 5, 7)
    assert top1["rate"] == pytest.approx(2 / 7) and top5["rate"] == pytest.approx(5 / 7)
    assert (top1["ci_low"], top1["ci_high"]) == pytest.approx(stats.wilson_interval(2, 7))
    assert top1["convention"] == "resnet50-top1" and top5["convention"] == "resnet50-top5"
    # any top-k from the stored record alone, counted by the convention itself (memora-batch rescore's code)
    rec = objects.object_record(lg, 497, {"weights": "test"})
    assert rec["rates"] == rates and rec["rate"] == top1
    assert conventions.get("custom:top=3").rate(rec)["k"] == 4


def test_rates_refuse_empty_and_bad_records():
    with pytest.raises(ValueError, match="no images"):
        objects.rates_from_images([], 0)
    with pytest.raises(ValueError, match="ranked classes"):
        objects.rates_from_images([{"index": 0, "topk": []}], 0)
    with pytest.raises(ValueError, match="outside the classifier's 1000 classes"):
        objects.image_records(torch.zeros(1, 1000), 1000)
    with pytest.raises(ValueError, match=r"convention must be one of \['resnet50-top1', 'resnet50-top5'\], got "
                                         "'custom:top=3'"):
        objects.object_record(torch.zeros(1, 1000), 0, {}, convention="custom:top=3")


# -- images --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("images, message", [
    (torch.rand(16, 16, 3), r"expected an IMAGE batch \[batch, height, width, channels\], got shape \(16, 16, 3\)"),
    (torch.rand(0, 16, 16, 3), "the image batch is empty"),
    (torch.rand(1, 16, 16, 2), "expected 1, 3 or 4 channels"),
    (torch.rand(1, 4, 16, 3), "too small"),
    (torch.full((1, 16, 16, 3), float("nan")), "NaN"),
    ("not images", "got str"),
])
def test_bad_images_are_refused(images, message):
    with pytest.raises(ValueError, match=message):
        objects.to_uint8(images)


def test_images_reach_the_model_as_saved_8_bit_rgb():
    x = torch.tensor([[[[0.0, 0.5, 1.0, 0.25]]]]).expand(1, 8, 8, 4)
    arr = objects.to_uint8(x)
    assert arr.dtype == np.uint8 and arr.shape == (1, 8, 8, 3)
    assert arr[0, 0, 0].tolist() == [0, 127, 255]     # truncated like SaveImage, alpha dropped
    grey = objects.to_uint8(torch.full((1, 8, 8, 1), 0.6))
    assert grey.shape == (1, 8, 8, 3) and (grey == 153).all()


# -- the classifiers -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("classifiers")
    model = score_models.torchvision_resnet50(d / "resnet50-0676ba61.pth", seed=0)
    return d / "resnet50-0676ba61.pth", model


def test_torchvision_file_loads_with_its_weight_sets_preprocessing(resnet_file, tmp_path):
    from torchvision.models import ResNet50_Weights

    path, model = resnet_file
    clf = objects.load_classifier(path)
    assert clf.source == "torchvision" and "resize shorter side to 256" in clf.preprocessing
    images = torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(3))
    got = objects.logits(clf, images)
    u8 = torch.from_numpy(objects.to_uint8(images)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        want = model(ResNet50_Weights.IMAGENET1K_V1.transforms()(u8))
    assert got.shape == (2, 1000) and torch.allclose(got, want, atol=1e-4)
    # the V2 file name selects V2's 232 px resize
    from safetensors.torch import save_file

    v2 = tmp_path / "resnet50-11ad3fa6.safetensors"     # the same tensors, converted and named as V2
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(v2))
    clf2 = objects.load_classifier(v2)
    assert "IMAGENET1K_V2" in clf2.preprocessing and "resize shorter side to 232" in clf2.preprocessing
    assert torch.allclose(objects.logits(clf2, images), model(ResNet50_Weights.IMAGENET1K_V2.transforms()(u8)),
                          atol=1e-4)


def test_object_score_record(resnet_file):
    path, model = resnet_file
    clf = objects.load_classifier(path)
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(4))
    top = int(objects.logits(clf, images)[0].argmax())
    rec = objects.score(clf, images, str(top), objects.TOP5)
    assert rec["schema"] == "memora.score-record/1" and rec["kind"] == "imagenet" and rec["targets"] == [top]
    assert rec["convention"] == "resnet50-top5" and rec["rate"] == rec["rates"]["resnet50-top5"]
    assert rec["images"][0]["topk"][0] == top and rec["images"][0]["target_rank"] == 1
    want1 = sum(im["topk"][0] == top for im in rec["images"])
    assert rec["rates"]["resnet50-top1"]["k"] == want1 >= 1
    assert "resnet50-top1: " in objects.report(rec)


@pytest.mark.parametrize("bin_weights", [False, True])
def test_transformers_resnet_folder(tmp_path, bin_weights):
    from transformers import AutoImageProcessor

    folder = tmp_path / "resnet-50"
    model = score_models.hf_resnet(folder, seed=1, bin_weights=bin_weights)
    assert (folder / "pytorch_model.bin").is_file() == bin_weights
    clf = objects.load_classifier(folder)
    assert clf.source == "transformers" and clf.num_classes == 1000 and "crop_pct" in clf.preprocessing
    images = torch.rand(2, 48, 40, 3, generator=torch.Generator().manual_seed(5))
    proc = AutoImageProcessor.from_pretrained(str(folder))
    with torch.inference_mode():
        want = model(**proc(images=list(objects.to_uint8(images)), return_tensors="pt")).logits
    assert torch.allclose(objects.logits(clf, images), want, atol=1e-5)
    assert proc(images=list(objects.to_uint8(images)), return_tensors="pt")["pixel_values"].shape[-1] == 224


def test_files_without_num_batches_tracked_load(tmp_path, resnet_file):
    sd = {k: v for k, v in resnet_file[1].state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    clf = objects.load_classifier(tmp_path / "old.pth")
    assert all(torch.equal(v, clf.model.state_dict()[k]) for k, v in sd.items())


def test_wrong_classifier_files_are_named(tmp_path):
    from torchvision.models import resnet18

    r18 = tmp_path / "resnet50-0676ba61.pth"
    torch.save(resnet18().state_dict(), r18)
    with pytest.raises(objects.ClassifierFileError, match=r"resnet50-0676ba61.pth is not a torchvision ResNet-50 "
                                                          r"state dict \(ImageNet, 1000 classes\): \d+ missing keys"):
        objects.load_classifier(r18)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(objects.ClassifierFileError, match="could not read junk.safetensors as a weights file"):
        objects.load_classifier(junk)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(objects.ClassifierFileError, match="expected a .pth/.pt/.safetensors/.bin state dict"):
        objects.load_classifier(tmp_path / "notes.txt")
    ten = tmp_path / "ten"
    score_models.hf_resnet(ten, num_labels=10)
    with pytest.raises(objects.ClassifierFileError, match="classifies into 10 classes, not the 1000"):
        objects.load_classifier(ten)
    (tmp_path / "empty").mkdir()
    with pytest.raises(objects.ClassifierFileError, match="has no config.json"):
        objects.load_classifier(tmp_path / "empty")
    (ten / "model.safetensors").unlink()
    with pytest.raises(objects.ClassifierFileError, match="no weights: expected model.safetensors or "
                                                          "pytorch_model.bin"):
        objects.load_classifier(ten)


def test_a_1000_class_transformers_resnet_that_is_not_a_resnet50_is_refused(tmp_path):
    score_models.hf_resnet(tmp_path / "r18", depths=(2, 2, 2, 2), layer_type="basic")  # a ResNet-18's layout
    with pytest.raises(objects.ClassifierFileError, match=r"r18/ is not a ResNet-50: its config.json has model_type "
                                                          r"'resnet', depths \[2, 2, 2, 2\], layer_type 'basic'"):
        objects.load_classifier(tmp_path / "r18")
    score_models.hf_resnet(tmp_path / "r50", seed=3)
    assert objects.load_classifier(tmp_path / "r50").num_classes == 1000


def test_style_classifier_labels(tmp_path):
    labels = ["vincent-van-gogh", "pablo-picasso", "claude-monet"]
    score_models.tiny_vit_classifier(tmp_path / "vit", labels, seed=2)
    clf = objects.load_transformers(tmp_path / "vit", num_classes=None)
    assert objects.classifier_labels(clf) == labels
    assert objects.resolve_label(labels, "Vincent Van_Gogh") == (0, "vincent-van-gogh")
    with pytest.raises(ValueError, match="no class 'van gog'; nearest: 'vincent-van-gogh'"):
        objects.resolve_label(labels, "van gog")
    images = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(6))
    lg = objects.logits(clf, images)
    rec = objects.label_score(clf, images, "pablo-picasso")
    assert rec["kind"] == "style-classifier" and rec["convention"] == "artist-top1"
    assert rec["rate"]["k"] == int((lg.argmax(1) == 1).sum())
    assert rec["rates"]["artist-top5"]["k"] == 3           # three classes: always among the top 5


# -- CLIP ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model = score_models.tiny_clip(folder, seed=0)
    return cs.load_clip(folder), model


def _forward_cosines(model, clip, images, prompts) -> torch.Tensor:
    """Cosines through CLIPModel.forward (logits_per_image / logit_scale): a second path to the same number."""
    enc = clip.tokenizer(prompts, padding=True, return_tensors="pt")
    px = clip.processor(images=list(objects.to_uint8(images)), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=px)
        return out.logits_per_image / model.logit_scale.exp()


def test_clip_score_equals_the_models_forward(tiny_clip):
    clip, model = tiny_clip
    images = torch.rand(3, 40, 36, 3, generator=torch.Generator().manual_seed(7))
    prompts = ["a church", "a photo of a dog", "a painting in the style of Van Gogh"]
    want = _forward_cosines(model, clip, images, prompts)
    rec = cs.clip_score(clip, images, "\n".join(prompts))
    got = [im["cosine"] for im in rec["images"]]
    assert got == pytest.approx([float(want[i, i]) for i in range(3)], abs=1e-5)
    assert [im["clip_score"] for im in rec["images"]] == pytest.approx([100 * max(c, 0.0) for c in got])
    assert rec["mean"]["convention"] == "clip-score-100" and rec["mean"]["n"] == 3
    one = cs.clip_score(clip, images, "a church")
    assert [im["cosine"] for im in one["images"]] == pytest.approx([float(want[i, 0]) for i in range(3)], abs=1e-5)


def test_clip_score_from_known_cosines():
    assert cs.clip_scores([-0.2, 0.0, 0.31, 1.0]) == pytest.approx([0.0, 0.0, 31.0, 100.0])
    rec = cs.score_record([0.2, 0.3, -0.1, 0.25], ["p"] * 4)
    assert rec["mean"]["mean"] == pytest.approx(18.75)
    assert (rec["mean"]["ci_low"], rec["mean"]["ci_high"]) == pytest.approx(
        stats.bootstrap_mean_interval([20.0, 30.0, 0.0, 25.0]))


def test_zero_shot_rate_from_known_cosines():
    cos = [[0.30, 0.20, 0.10], [0.10, 0.40, 0.00], [0.50, 0.50, 0.10], [0.2, 0.1, 0.3]]
    rec = cs.zero_shot_rate(cos)
    assert (rec["k"], rec["n"], rec["convention"]) == (2, 4, "clip-zeroshot-style")   # a tie goes to the target
    per = cs.zero_shot_images(cos)
    assert per[1]["topk"] == [1, 0, 2] and per[1]["topk_scores"] == pytest.approx([0.4, 0.1, 0.0])
    assert cs.zero_shot_rate(cos, target=1)["k"] == 1
    with pytest.raises(ValueError, match="two prompts"):
        cs.zero_shot_rate([[0.3]])
    rec = cs.style_record(cos, "Van Gogh", ["Monet", "Picasso"])
    per_image = cs.style_tables(rec)[1]
    assert per_image["columns"][1] == "best_prompt"
    assert [r[1] for r in per_image["rows"]] == [f"a painting in the style of {a}" for a in
                                                 ("Van Gogh", "Monet", "Van Gogh", "Picasso")]
    assert [r[2:] for r in per_image["rows"]] == [[0.3, 0.3], [0.4, 0.1], [0.5, 0.5], [0.3, 0.2]]


def test_style_score_equals_the_models_forward(tiny_clip):
    clip, model = tiny_clip
    images = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(8))
    others = ["Pablo Picasso", "Claude Monet"]
    prompts = cs.style_prompts("Van Gogh", others)
    want = _forward_cosines(model, clip, images, prompts)
    rec = cs.style_score(clip, images, "Van Gogh", others)
    assert rec["prompts"] == ["a painting in the style of Van Gogh", "a painting in the style of Pablo Picasso",
                              "a painting in the style of Claude Monet"]
    assert np.allclose([im["cosines"] for im in rec["images"]], want.numpy(), atol=1e-5)
    assert rec["rate"]["k"] == int((want.argmax(1) == 0).sum())
    assert rec["kind"] == "clip-zeroshot" and rec["targets"] == [0]


def test_prompt_and_artist_lists():
    assert cs.parse_prompts("a church\n\n", 3) == ["a church"] * 3
    assert cs.parse_prompts("a\nb", 2) == ["a", "b"]
    with pytest.raises(ValueError, match="3 prompt lines for 2 images"):
        cs.parse_prompts("a\nb\nc", 2)
    with pytest.raises(ValueError, match="prompt is empty"):
        cs.parse_prompts("  \n", 2)
    assert cs.parse_artists("Pablo Picasso, Rembrandt;Monet\n, ") == ["Pablo Picasso", "Rembrandt", "Monet"]
    with pytest.raises(ValueError, match="exactly one '{}'"):
        cs.style_prompts("Van Gogh", ["Monet"], "in the style of")
    with pytest.raises(ValueError, match="no other artists"):
        cs.style_prompts("Van Gogh", ["van gogh"])
    with pytest.raises(ValueError, match="target artist is empty"):
        cs.style_prompts(" ", ["Monet"])


def test_wrong_clip_files_are_named(tmp_path, tiny_clip):
    import json

    with pytest.raises(objects.ClassifierFileError, match="single file: the CLIP score needs a transformers "
                                                          "CLIPModel folder"):
        (tmp_path / "clip_vision_g.safetensors").write_bytes(b"x")
        cs.load_clip(tmp_path / "clip_vision_g.safetensors")
    vision = tmp_path / "vision-only"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    (vision / "model.safetensors").write_bytes(b"x")
    with pytest.raises(objects.ClassifierFileError, match="only CLIP's vision tower: the score needs the text tower"):
        cs.load_clip(vision)
    folder = tmp_path / "no-tokenizer"
    score_models.tiny_clip(folder)
    (folder / "vocab.json").unlink()
    with pytest.raises(objects.ClassifierFileError, match="no tokenizer: expected vocab.json \\+ merges.txt"):
        cs.load_clip(folder)
    resnet = tmp_path / "resnet"
    score_models.hf_resnet(resnet)
    with pytest.raises(objects.ClassifierFileError, match="is a 'resnet' model, not a CLIP model"):
        cs.load_clip(resnet)


# -- nothing downloads -------------------------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_every_loader_works_offline(tmp_path_factory, resnet_file, no_network):
    d = tmp_path_factory.mktemp("offline")
    score_models.hf_resnet(d / "resnet-50", bin_weights=True)
    score_models.tiny_clip(d / "clip")
    score_models.tiny_vit_classifier(d / "vit", ["a", "b"])
    images = torch.rand(1, 32, 32, 3)
    assert objects.logits(objects.load_classifier(resnet_file[0]), images).shape == (1, 1000)
    assert objects.logits(objects.load_classifier(d / "resnet-50"), images).shape == (1, 1000)
    assert objects.logits(objects.load_transformers(d / "vit", num_classes=None), images).shape == (1, 2)
    assert cs.clip_score(cs.load_clip(d / "clip"), images, "a church")["mean"]["n"] == 1
