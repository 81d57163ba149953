"""Random weights, built in code, in the file layouts the score nodes read (nothing downloaded):

* ``torchvision_resnet50``: torchvision's ResNet-50 state dict, saved as ``resnet50-0676ba61.pth`` would be
  (or as .safetensors);
* ``hf_resnet``: a small transformers ResNetForImageClassification folder (config.json + model.safetensors +
  preprocessor_config.json), the layout of ``microsoft/resnet-50``;
* ``tiny_clip``: a tiny transformers CLIPModel folder with a byte-level tokenizer (vocab.json + merges.txt) and
  preprocessor_config.json, the layout of ``openai/clip-vit-large-patch14``."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def torchvision_resnet50(path: Path, seed: int = 0) -> torch.nn.Module:
    from torchvision.models import resnet50

    torch.manual_seed(seed)
    model = resnet50(weights=None).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return model


def hf_resnet(folder: Path, num_labels: int = 1000, seed: int = 0, bin_weights: bool = False,
              depths=(3, 4, 6, 3), layer_type: str = "bottleneck"):
    """A narrow random ResNetForImageClassification in microsoft/resnet-50's layout: ResNet-50's depths and
    bottleneck blocks with few channels; config.json, the weights as model.safetensors (or pytorch_model.bin) and
    microsoft's preprocessor_config.json (its legacy ConvNextFeatureExtractor form)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=list(depths), layer_type=layer_type,
                       num_labels=num_labels)
    model = ResNetForImageClassification(cfg).eval()
    model.save_pretrained(str(folder))
    if bin_weights:
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_pct": 0.875, "do_normalize": True, "do_resize": True, "feature_extractor_type": "ConvNextFeatureExtractor",
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 224}))
    return model


def _byte_vocab() -> tuple[dict, list[str]]:
    """CLIP's byte-level BPE vocabulary without merges: the 256 byte characters, each also with '</w>'."""
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, ["#version: 0.2"]


def tiny_clip(folder: Path, seed: int = 0):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    vocab, merges = _byte_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": vocab["<|startoftext|>"],
                     "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return model


def tiny_vit_classifier(folder: Path, labels: list[str], seed: int = 0):
    """A tiny transformers ViTForImageClassification folder with named labels (the layout of UnlearnDiffAtk's
    artist classifier checkpoint: config.json with id2label, model.safetensors, preprocessor_config.json)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8, num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={lb: i for i, lb in enumerate(labels)})
    model = ViTForImageClassification(cfg).eval()
    model.save_pretrained(str(folder))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return model
