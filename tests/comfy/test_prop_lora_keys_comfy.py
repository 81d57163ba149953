"""LoRA key names between ComfyUI and kohya/PEFT for every layer of the real SD1.5, SD2 and SDXL UNets and their CLIP
text encoders, checked against ComfyUI's own key maps (the ComfyUI half of tests/unit/test_prop_lora_keys.py).

The models are ComfyUI's own classes built on the meta device (no weights): the UNet's configuration is detected by
comfy.model_detection from the diffusers UNet's state dict (the same published configs as the unit test), the text
encoders are comfy.sd1_clip.SD1ClipModel, comfy.text_encoders.sd2_clip.SD2ClipModel and comfy.sdxl_clip.SDXLClipModel.
For every layer:
- ComfyUI-native key (diffusion_model.<ldm path>, conv downs flattened) -> memora to_kohya -> the kohya name of the
  layer's diffusers path, and ComfyUI's LoRA key map (comfy.lora.model_lora_keys_unet) sends that kohya name to the
  same model weight as the native key: native -> kohya -> ComfyUI closes the loop; the deltas survive (hypothesis);
- the kohya text-encoder names the pack writes (lora_te_, lora_te2_ for SDXL's bigG) are in ComfyUI's CLIP key map
  (comfy.lora.model_lora_keys_clip) on the right encoder;
- the PEFT/diffusers spelling (kohya_to_diffusers) is in ComfyUI's key maps for every layer except the UNet's
  attention projections (to_q, to_k, to_v, to_out.0: ComfyUI maps only their old '.processor.' spelling, upstream
  Comfy-Org/ComfyUI#9753) and bigG's text_projection (ComfyUI maps only the kohya spelling); the kohya file is the
  one that loads completely, which is why the pack writes kohya."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memora.lora import apply as lora_apply
from memora.lora import formats as F

pytestmark = pytest.mark.comfy

PROP = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _unit_module():
    """tests/unit/test_prop_lora_keys.py (the layer lists from diffusers/transformers), loaded by path."""
    path = Path(__file__).resolve().parent.parent / "unit" / "test_prop_lora_keys.py"
    spec = importlib.util.spec_from_file_location("memora_prop_lora_keys_unit", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


U = _unit_module()
ARCHS = list(U.UNET_CONFIGS)


@functools.lru_cache(maxsize=None)
def comfy_unet(arch: str):
    """(ComfyUI BaseModel on meta, ldm -> diffusers module map, ComfyUI's UNet LoRA key map)."""
    import comfy.lora
    import comfy.model_detection
    import comfy.utils
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**U.UNET_CONFIGS[arch])
    config = comfy.model_detection.model_config_from_diffusers_unet(unet.state_dict())
    assert type(config).__name__ == {"sd15": "SD15", "sd2": "SD20", "sdxl": "SDXL"}[arch]
    with torch.device("meta"):
        model = config.get_model({})
    ldm_map = lora_apply.module_map(comfy.utils.unet_to_diffusers(model.model_config.unet_config))
    return model, ldm_map, comfy.lora.model_lora_keys_unet(model, {})


@functools.lru_cache(maxsize=None)
def comfy_clip_keys(arch: str) -> dict[str, str]:
    import comfy.lora
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.sd2_clip

    cls = {"sd15": comfy.sd1_clip.SD1ClipModel, "sd2": comfy.text_encoders.sd2_clip.SD2ClipModel,
           "sdxl": comfy.sdxl_clip.SDXLClipModel}[arch]
    with torch.device("meta"):
        model = cls(device="meta")
    return comfy.lora.model_lora_keys_clip(model, {})


def _diffusers_to_ldm(arch):
    _, ldm_map, _ = comfy_unet(arch)
    inverse = {d: ldm for ldm, d in ldm_map.items()}
    assert len(inverse) == len(ldm_map)
    return inverse


@pytest.mark.parametrize("arch", ARCHS)
def test_every_unet_layer_native_kohya_comfyui_loop(comfy, arch):
    model, ldm_map, key_map = comfy_unet(arch)
    layers = U.unet_layers(arch)
    to_ldm = _diffusers_to_ldm(arch)
    missing = sorted(set(layers) - set(to_ldm))
    assert missing == [], f"diffusers layers without a ComfyUI module: {missing[:10]}"
    native = {}
    for m in layers:
        native[f"diffusion_model.{to_ldm[m]}.lora_up.weight"] = torch.ones(1, 1)
        native[f"diffusion_model.{to_ldm[m]}.lora_down.weight"] = torch.ones(1, 1)
    kohya = F.to_kohya(native, ldm_map)
    names = {k.rsplit(".", 2)[0] for k in kohya if k.endswith(".lora_down.weight")}
    assert names == {F.module_to_kohya(m) for m in layers}
    wrong = [m for m in layers if key_map.get(F.module_to_kohya(m)) != f"diffusion_model.{to_ldm[m]}.weight"
             or key_map.get(f"diffusion_model.{to_ldm[m]}") != f"diffusion_model.{to_ldm[m]}.weight"]
    assert not wrong, wrong[:10]


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_names_comfyui_loads_are_all_but_the_attention_projections(comfy, arch):
    _, _, key_map = comfy_unet(arch)
    layers = U.unet_layers(arch)
    sd = U._kohya_sd([(F.UNET_PREFIX, m, (1, 1)) for m in layers], [1] * len(layers), [1.0] * len(layers),
                     torch.float32, 0)
    peft = F.kohya_to_diffusers(sd, list(layers))
    unloaded = {k[len("unet."):].rsplit(".", 2)[0] for k in peft if k.rsplit(".", 2)[0] not in key_map}
    attention = {m for m in layers if m.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))}
    assert unloaded == attention


@pytest.mark.parametrize("arch", ARCHS)
def test_every_text_encoder_layer_is_in_comfyui_clip_key_map(comfy, arch):
    keys = comfy_clip_keys(arch)
    encoders = {"sd15": [("clip-l", "lora_te_", "clip_l")], "sd2": [("openclip-h", "lora_te_", "clip_h")],
                "sdxl": [("clip-l", "lora_te_", "clip_l"), ("openclip-bigg", "lora_te2_", "clip_g")]}[arch]
    for clip_arch, prefix, comfy_name in encoders:
        layers = U.clip_layers(clip_arch)
        wrong = [m for m in layers if keys.get(F.module_to_kohya(m, prefix)) != f"{comfy_name}.transformer.{m}.weight"]
        assert not wrong, (clip_arch, wrong[:10])
        diffusers_prefix = "text_encoder_2." if prefix == "lora_te2_" else "text_encoder."
        sd = U._kohya_sd([(prefix, m, (1, 1)) for m in layers], [1] * len(layers), [1.0] * len(layers),
                         torch.float32, 0)
        peft = F.kohya_to_diffusers(sd)
        unloaded = {k.rsplit(".", 2)[0] for k in peft if k.rsplit(".", 2)[0] not in keys}
        assert unloaded == ({f"{diffusers_prefix}text_projection"} if "text_projection" in layers else set())


_MODULE_MAP_SDXL = """
import sys
sys.path.insert(0, sys.argv[1])
import comfy.utils
from memora.lora.apply import module_map
cfg = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
       "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
       "num_classes": "sequential", "adm_in_channels": 2816}
m = module_map(comfy.utils.unet_to_diffusers(cfg))
print(m["label_emb.0.0"], m["label_emb.0.2"])
"""


def test_sdxl_label_emb_maps_to_add_embedding_in_every_process(comfy_path, repo_root):
    import os
    import subprocess
    import sys

    for seed in ("0", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(repo_root))
        out = subprocess.run([sys.executable, "-c", _MODULE_MAP_SDXL, str(comfy_path)], env=env, check=True,
                             capture_output=True, text=True, timeout=120).stdout.split()
        assert out == ["add_embedding.linear_1", "add_embedding.linear_2"], (seed, out)


@st.composite
def native_loras(draw, arch):
    layers = U.unet_layers(arch)
    names = sorted(layers)
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=5, unique=True))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    to_ldm = _diffusers_to_ldm(arch)
    native, expected = {}, {}
    for m in chosen:
        shape = layers[m]
        r = draw(st.integers(1, 3))
        alpha = draw(st.sampled_from([None, 1.0, 4.0]))
        flat_in = 1
        for s in shape[1:]:
            flat_in *= s
        down, up = torch.randn(r, flat_in, generator=g), torch.randn(shape[0], r, generator=g)  # ComfyUI: flattened
        key = f"diffusion_model.{to_ldm[m]}"
        native[f"{key}.lora_down.weight"], native[f"{key}.lora_up.weight"] = down, up
        if alpha is not None:
            native[f"{key}.alpha"] = torch.tensor(alpha)
        expected[F.module_to_kohya(m)] = (down, up, (alpha if alpha is not None else r) / r, shape)
    return native, expected


@pytest.mark.parametrize("arch", ARCHS)
@PROP
@given(data=st.data())
def test_native_lora_reads_to_the_same_factors_and_shapes(comfy, arch, data):
    native, expected = data.draw(native_loras(arch))
    _, ldm_map, _ = comfy_unet(arch)
    kohya = F.to_kohya(native, ldm_map, weight_shapes=U.unet_layers(arch))
    layers = F.kohya_layers(kohya)
    assert set(layers) == set(expected)
    for name, (down, up, scale, shape) in expected.items():
        layer = layers[name]
        assert layer.scale == scale
        assert (int(layer.up.shape[0]), *[int(s) for s in layer.down.shape[1:]]) == tuple(shape)
        assert torch.equal(layer.down.flatten(1), down) and torch.equal(layer.up.flatten(1), up)
