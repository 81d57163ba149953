"""The object / CLIP / style score nodes in graphs run by ComfyUI's executor, with weights built in code and placed
in ComfyUI's model folders (models/classifiers, models/clip_vision) in the layouts docs/evaluation.md names; their
numbers are checked against an independent computation, and missing or wrong files give the specific errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import score_models
from graphs import Graph

ARTISTS = ["vincent-van-gogh", "pablo-picasso", "claude-monet", "rembrandt"]


@pytest.fixture(scope="module")
def score_weights(comfy, comfy_base):
    """A random torchvision ResNet-50 as resnet50-0676ba61.pth, a transformers ResNet folder and a ViT artist
    classifier in models/classifiers; a tiny CLIPModel folder in models/clip_vision."""
    cls_dir = comfy_base / "models" / "classifiers"
    clip_dir = comfy_base / "models" / "clip_vision" / "tiny-clip"
    built = {
        "torchvision": score_models.torchvision_resnet50(cls_dir / "resnet50-0676ba61.pth", seed=0),
        "hf": score_models.hf_resnet(cls_dir / "resnet-50", seed=1),
        "vit": score_models.tiny_vit_classifier(cls_dir / "artists-vit", ARTISTS, seed=2),
        "clip": score_models.tiny_clip(clip_dir, seed=0),
    }
    return built


def _noise_png(comfy_base: Path, name: str, seed: int, size=(48, 40)) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(comfy_base / "input" / name)
    return pixels


def _images(g: Graph, comfy_base: Path, seeds=(1, 2)):
    """A batch of two noise PNGs through LoadImage + ImageBatch: (the batch node, the IMAGE tensor it gives)."""
    (comfy_base / "input").mkdir(exist_ok=True)
    loads, arrays = [], []
    for s in seeds:
        arrays.append(_noise_png(comfy_base, f"memora_noise_{s}.png", s))
        loads.append(g.node("LoadImage", image=f"memora_noise_{s}.png"))
    images = torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)   # what LoadImage makes of them
    return g.node("ImageBatch", image1=loads[0][0], image2=loads[1][0]), images


def _record(output_dir: Path, report: str) -> dict:
    return json.loads((output_dir / report.rsplit("JSON record: ", 1)[1].strip()).read_text())


def _torchvision_logits(model, images: torch.Tensor) -> torch.Tensor:
    from torchvision.models import ResNet50_Weights

    u8 = torch.from_numpy(np.clip(255.0 * images[..., :3].numpy(), 0, 255).astype(np.uint8)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        return model(ResNet50_Weights.IMAGENET1K_V1.transforms()(u8))


def test_object_score_node_torchvision_file(comfy, comfy_base, score_weights, output_dir, events):
    g = Graph()
    batch, images = _images(g, comfy_base)
    want = _torchvision_logits(score_weights["torchvision"], images)
    target = int(want[0].argmax())                       # the class the model gives image 0: top-1 rate >= 1/2
    node = g.node("MemoRaObjectScore", images=batch[0], classifier="resnet50-0676ba61.pth",
                  target_class=str(target), convention="resnet50-top1", filename_prefix="memora_test/object")
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    rate, top1, top5, report = comfy.node_outputs(node.id)
    k1 = int((want.argmax(1) == target).sum())
    k5 = int(sum(target in row.topk(5).indices.tolist() for row in want))
    assert (rate, top1, top5) == (k1 / 2, k1 / 2, k5 / 2) and k1 >= 1
    rec = _record(output_dir, report)
    assert rec["schema"] == "memora.score-record/1" and rec["kind"] == "imagenet" and rec["targets"] == [target]
    for im, row in zip(rec["images"], want):
        assert im["topk"] == row.topk(5).indices.tolist()
        assert im["topk_scores"] == pytest.approx(row.topk(5).values.tolist(), abs=1e-4)
    assert rec["detector"]["weights"] == "resnet50-0676ba61.pth"
    tables = res.ui_outputs[node.id]["memora_scores"]
    assert tables[0]["columns"] == ["rate", "k", "n", "ci_low", "ci_high", "convention"]
    assert tables[0]["rows"][0][:3] == [k1 / 2, k1, 2] and tables[0]["rows"][0][5] == "resnet50-top1"
    assert [r[0] for r in tables[1]["rows"]] == ["resnet50-top1", "resnet50-top5"]
    assert any(e == "memora.scores" and d["title"] == "Object score (ResNet-50)" for e, d in events.sent)


def test_object_score_node_transformers_folder(comfy, comfy_base, score_weights, output_dir):
    from transformers import AutoImageProcessor

    g = Graph()
    batch, images = _images(g, comfy_base, seeds=(3, 4))
    node = g.node("MemoRaObjectScore", images=batch[0], classifier="resnet-50/", target_class="garbage truck",
                  convention="resnet50-top5", filename_prefix="memora_test/object_hf")
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    assert torch.equal(comfy.node_outputs(batch.id)[0], images)
    proc = AutoImageProcessor.from_pretrained(str(comfy_base / "models" / "classifiers" / "resnet-50"))
    u8 = np.clip(255.0 * images.numpy(), 0, 255).astype(np.uint8)
    with torch.inference_mode():
        want = score_weights["hf"](**proc(images=list(u8), return_tensors="pt")).logits
    rate, top1, top5, report = comfy.node_outputs(node.id)
    k5 = int(sum(569 in row.topk(5).indices.tolist() for row in want))
    assert rate == top5 == k5 / 2 and top1 == int((want.argmax(1) == 569).sum()) / 2
    rec = _record(output_dir, report)
    assert rec["convention"] == "resnet50-top5" and rec["detector"]["source"] == "transformers"
    assert [im["target_rank"] for im in rec["images"]] == [int((row >= row[569]).sum()) for row in want]


def test_object_score_missing_and_wrong_files(comfy, comfy_base, score_weights, tmp_path, monkeypatch):
    import folder_paths

    def use_folder(path: Path):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, "classifiers", ([str(path)], {""}))
        folder_paths.filename_list_cache.pop("classifiers", None)

    def run(classifier="auto", target="church"):
        g = Graph()
        batch, _ = _images(g, comfy_base)
        g.node("MemoRaObjectScore", images=batch[0], classifier=classifier, target_class=target,
               convention="resnet50-top1", filename_prefix="memora_test/object_bad")
        return comfy.run(g.prompt)

    empty = tmp_path / "classifiers"
    empty.mkdir()
    use_folder(empty)
    res = run()
    assert not res.success and "no ImageNet ResNet-50 classifier found" in res.error_message
    assert str(empty) in res.error_message and "resnet50-0676ba61.pth" in res.error_message
    assert "microsoft-resnet-50/" in res.error_message
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), empty / "resnet50-11ad3fa6.pth")
    folder_paths.filename_list_cache.pop("classifiers", None)
    res = run("resnet50-11ad3fa6.pth")
    assert not res.success and "resnet50-11ad3fa6.pth is not a torchvision ResNet-50 state dict" in res.error_message
    monkeypatch.undo()
    folder_paths.filename_list_cache.pop("classifiers", None)
    res = run("resnet50-0676ba61.pth", "churh")
    assert not res.success and "unknown ImageNet class 'churh'; nearest: 'church'" in res.error_message


def test_object_score_bad_images_direct(comfy, score_weights):
    import nodes

    node = nodes.NODE_CLASS_MAPPINGS["MemoRaObjectScore"]
    for images, message in [(torch.rand(0, 32, 32, 3), "the image batch is empty"),
                            (torch.rand(32, 32, 3), "expected an IMAGE batch"),
                            (torch.rand(1, 32, 32, 2), "expected 1, 3 or 4 channels")]:
        with pytest.raises(ValueError, match=message):
            node.execute(images, "resnet50-0676ba61.pth", "church", "resnet50-top1", "memora_test/x")


def _clip_cosines(clip_model, folder: Path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Cosines through CLIPModel.forward with the folder's own tokenizer and image processor."""
    from transformers import CLIPImageProcessor, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder))
    proc = CLIPImageProcessor.from_pretrained(str(folder))
    enc = tok(prompts, padding=True, return_tensors="pt")
    u8 = np.clip(255.0 * images.numpy(), 0, 255).astype(np.uint8)
    with torch.inference_mode():
        out = clip_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                         pixel_values=proc(images=list(u8), return_tensors="pt")["pixel_values"])
        return out.logits_per_image / clip_model.logit_scale.exp()


def test_clip_and_style_score_nodes(comfy, comfy_base, score_weights, output_dir):
    from memora.evaluation import clip_score as cs

    folder = comfy_base / "models" / "clip_vision" / "tiny-clip"
    g = Graph()
    batch, images = _images(g, comfy_base, seeds=(5, 6))
    candidates = ["a church", "a photo of a dog", "a painting", "a red car", "an old map"]
    cand = _clip_cosines(score_weights["clip"], folder, images, candidates)
    prompt = candidates[int(cand[0].argmax())]            # the most aligned prompt: a positive score if any is
    artists = ["Van Gogh", "Pablo Picasso", "Claude Monet"]
    style_cos = _clip_cosines(score_weights["clip"], folder, images, cs.style_prompts(artists[0], artists[1:]))
    target = artists[int(style_cos[0].argmax())]          # image 0's best artist: a rate >= 1/2
    others = [a for a in artists if a != target]
    clip_node = g.node("MemoRaClipScore", images=batch[0], clip_model="auto", prompt=prompt,
                       filename_prefix="memora_test/clip")
    style = g.node("MemoRaStyleScore", images=batch[0], clip_model="clip_vision/tiny-clip/", target_artist=target,
                   other_artists=", ".join(others), template="a painting in the style of {}",
                   filename_prefix="memora_test/style")
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    score, report = comfy.node_outputs(clip_node.id)
    j = candidates.index(prompt)
    want = [100 * max(float(c), 0.0) for c in cand[:, j]]
    assert score == pytest.approx(sum(want) / 2, abs=1e-3) and max(want) > 0
    rec = _record(output_dir, report)
    assert [im["clip_score"] for im in rec["images"]] == pytest.approx(want, abs=1e-3)
    assert res.ui_outputs[clip_node.id]["memora_scores"][0]["columns"] == ["mean", "n", "ci_low", "ci_high",
                                                                          "convention"]
    rate, report = comfy.node_outputs(style.id)
    cos = _clip_cosines(score_weights["clip"], folder, images, cs.style_prompts(target, others))
    assert rate == int((cos.argmax(1) == 0).sum()) / 2 >= 0.5
    rec = _record(output_dir, report)
    assert rec["kind"] == "clip-zeroshot" and rec["convention"] == "clip-zeroshot-style"
    assert np.allclose([im["cosines"] for im in rec["images"]], cos.numpy(), atol=1e-5)


def test_clip_nodes_refuse_missing_models(comfy, comfy_base, score_weights, tmp_path, monkeypatch):
    import folder_paths

    for name in ("clip_vision", "text_encoders"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(tmp_path / name)], {".safetensors"}))
    g = Graph()
    batch, _ = _images(g, comfy_base)
    g.node("MemoRaClipScore", images=batch[0], clip_model="auto", prompt="a church",
           filename_prefix="memora_test/clip_missing")
    res = comfy.run(g.prompt)
    assert not res.success and "no CLIP model found" in res.error_message
    assert "openai/clip-vit-large-patch14" in res.error_message and str(tmp_path / "clip_vision") in res.error_message


def test_style_classifier_node(comfy, comfy_base, score_weights, output_dir):
    from transformers import AutoImageProcessor

    folder = comfy_base / "models" / "classifiers" / "artists-vit"
    g = Graph()
    batch, images = _images(g, comfy_base, seeds=(7, 8))
    proc = AutoImageProcessor.from_pretrained(str(folder))
    u8 = np.clip(255.0 * images.numpy(), 0, 255).astype(np.uint8)
    with torch.inference_mode():
        want = score_weights["vit"](**proc(images=list(u8), return_tensors="pt")).logits
    target = ARTISTS[int(want[0].argmax())]
    node = g.node("MemoRaStyleClassifierScore", images=batch[0], classifier="artists-vit/",
                  target_label=target.replace("-", " ").title(), convention="artist-top1",
                  filename_prefix="memora_test/style_cls")
    bad = Graph()
    b2, _ = _images(bad, comfy_base, seeds=(7, 8))
    bad.node("MemoRaStyleClassifierScore", images=b2[0], classifier="artists-vit/", target_label="van gog",
             convention="artist-top1", filename_prefix="memora_test/style_cls")
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    rate, report = comfy.node_outputs(node.id)
    assert rate == int((want.argmax(1) == ARTISTS.index(target)).sum()) / 2 >= 0.5
    rec = _record(output_dir, report)
    assert rec["target_names"] == [target] and rec["kind"] == "style-classifier"
    res = comfy.run(bad.prompt)
    assert not res.success and "no class 'van gog'; nearest: 'vincent-van-gogh'" in res.error_message
