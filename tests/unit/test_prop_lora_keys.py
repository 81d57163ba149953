"""LoRA key names round-tripping kohya <-> diffusers <-> PEFT for every layer of the real SD1.5, SD2, SDXL UNets and
the CLIP-L, OpenCLIP-H (SD2) and OpenCLIP-bigG (SDXL) text encoders (memora/lora/formats.py), with hypothesis for the
tensors. (The ComfyUI-native side, ldm names from comfy.utils.unet_to_diffusers, is tests/comfy/test_prop_lora_keys_comfy.py.)

The layer lists come from the architectures themselves: diffusers' UNet2DConditionModel and transformers'
CLIPTextModel(WithProjection) built on the meta device (no weights, no download) from the published configurations;
a layer is every Linear and Conv2d module (what a LoRA can target). Properties, for every layer of every model:
- kohya name <-> module path: kohya_to_module(module_to_kohya(m)) == m, with and without the model's module list;
- kohya -> diffusers/PEFT (kohya_to_diffusers) -> kohya (to_kohya) gives back the same layer names and the same
  weight deltas (alpha / r folded into lora_B on the way: the PEFT file carries no alpha);
- the diffusers-old spelling (unet.<m>.lora.down.weight, what the MemoRa reference writes) reads to the same names;
- our PEFT -> kohya names equal diffusers' own convert_state_dict_to_kohya (an independent implementation).
The kohya spelling of the SDXL text encoders: lora_te1_ (CLIP-L) is read as lora_te_ (ComfyUI and diffusers read both
as the first text encoder), lora_te2_ (bigG) stays lora_te2_ (text_encoder_2. in diffusers)."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes import REAL_UNET_CONFIGS
from memora.lora import formats as F

PROP = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# The published configurations (tests/support/probes.py), reduced to what fixes the layer names.
UNET_CONFIGS = REAL_UNET_CONFIGS
CLIP_CONFIGS = {
    "clip-l": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12), False),
    "openclip-h": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                        hidden_act="gelu", projection_dim=1024), False),
    "openclip-bigg": (dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           hidden_act="gelu", projection_dim=1280), True),
}
# kohya prefix of each text encoder as the SD families use them
TE_PREFIX = {"clip-l": "lora_te_", "openclip-h": "lora_te_", "openclip-bigg": "lora_te2_"}
EXPECTED_UNET_LAYERS = {"sd15": 282, "sd2": 282, "sdxl": 794}


def _layers(model) -> dict[str, tuple]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@functools.lru_cache(maxsize=None)
def unet_layers(arch: str) -> dict[str, tuple]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return _layers(UNet2DConditionModel(**UNET_CONFIGS[arch]))


@functools.lru_cache(maxsize=None)
def clip_layers(arch: str) -> dict[str, tuple]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg, projection = CLIP_CONFIGS[arch]
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**cfg))
    return {_checkpoint_name(m): s for m, s in _layers(model).items()}


def _checkpoint_name(module: str) -> str:
    """The module path as checkpoints, kohya and ComfyUI spell it: transformers >= 5 dropped CLIPTextModel's
    'text_model.' level from its module names ('encoder.layers.0...'), which the files keep."""
    return module if module.startswith(("text_model.", "text_projection")) else "text_model." + module


@functools.lru_cache(maxsize=None)
def clip_module_names(arch: str) -> list[str]:
    """The module names of the installed transformers' CLIP class (with or without 'text_model.')."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg, projection = CLIP_CONFIGS[arch]
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**cfg))
    return list(_layers(model))


def _all_layers() -> list[tuple[str, str, str, tuple]]:
    """(model, kohya prefix, module path, weight shape) for every layer of every model."""
    out = [(a, F.UNET_PREFIX, m, s) for a in UNET_CONFIGS for m, s in unet_layers(a).items()]
    out += [(a, TE_PREFIX[a], m, s) for a in CLIP_CONFIGS for m, s in clip_layers(a).items()]
    return out


def test_layer_lists_are_the_real_architectures():
    assert {a: len(unet_layers(a)) for a in UNET_CONFIGS} == EXPECTED_UNET_LAYERS
    assert sum(1 for m in unet_layers("sdxl") if m.endswith(".attn2.to_k")) == 70  # SDXL: 70 transformer blocks
    assert unet_layers("sdxl")["add_embedding.linear_1"] == (1280, 2816)
    assert len(clip_layers("clip-l")) == 12 * 6  # q, k, v, out, fc1, fc2 per layer
    assert len(clip_layers("openclip-h")) == 23 * 6
    assert len(clip_layers("openclip-bigg")) == 32 * 6 + 1  # + text_projection
    assert clip_layers("openclip-bigg")["text_projection"] == (1280, 1280)
    assert "text_model.encoder.layers.11.self_attn.out_proj" in clip_layers("clip-l")


@pytest.mark.parametrize("arch,prefix", [(a, p) for a in ("clip-l", "openclip-h")
                                         for p in ("text_encoder.", "base_model.model.", "")]
                         + [("openclip-bigg", "text_encoder_2.")])
def test_peft_text_encoder_keys_under_transformers_module_names_read_to_the_kohya_names(arch, prefix):
    """A PEFT file saved from the installed transformers' CLIP model: its module names (with transformers >= 5,
    'encoder.layers.0.self_attn.q_proj', no 'text_model.') read to the kohya names ComfyUI loads
    ('lora_te_text_model_encoder_layers_0_self_attn_q_proj'); before the fix they became 'lora_te_encoder_...' (a
    name ComfyUI does not load) or, without a prefix, 'lora_unet_encoder_...'."""
    peft = {}
    for m in clip_module_names(arch):
        peft[f"{prefix}{m}.lora_A.weight"] = torch.ones(1, 2)
        peft[f"{prefix}{m}.lora_B.weight"] = torch.ones(2, 1)
    kohya_prefix = "lora_te2_" if arch == "openclip-bigg" else F.TE_PREFIX
    expected = {F.module_to_kohya(m, kohya_prefix) for m in clip_layers(arch)}
    got = {k.rsplit(".", 2)[0] for k in F.to_kohya(peft) if k.endswith(".lora_down.weight")}
    assert got == expected


@pytest.mark.parametrize("arch", [*UNET_CONFIGS, *CLIP_CONFIGS])
def test_every_layer_name_round_trips_with_and_without_the_module_list(arch):
    layers = unet_layers(arch) if arch in UNET_CONFIGS else clip_layers(arch)
    prefix = F.UNET_PREFIX if arch in UNET_CONFIGS else TE_PREFIX[arch]
    bad = []
    for m in layers:
        k = F.module_to_kohya(m, prefix)
        if F.kohya_to_module(k) != m or F.kohya_to_module(k, layers) != m or F.module_to_kohya(F.kohya_to_module(k),
                                                                                                  prefix) != k:
            bad.append(m)
    assert not bad, bad[:10]


def _kohya_sd(layers: list[tuple[str, str, tuple]], ranks, alphas, dtype, seed) -> dict[str, torch.Tensor]:
    """kohya state dict with one layer per (prefix, module, shape); small random factors of the real shapes."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for (prefix, m, shape), r, a in zip(layers, ranks, alphas):
        name = F.module_to_kohya(m, prefix)
        down = torch.randn(r, *shape[1:], generator=g)
        up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=g)
        sd[f"{name}.lora_down.weight"] = down.to(dtype)
        sd[f"{name}.lora_up.weight"] = up.to(dtype)
        sd[f"{name}.alpha"] = torch.tensor(float(a))
    return sd


def _assert_same(sd_a, sd_b, rtol):
    """Same layers, same lora_down, same scale * lora_up (so the same weight delta, without forming the dense
    delta: SDXL's layers reach 10240 x 1280)."""
    la, lb = F.kohya_layers(sd_a), F.kohya_layers(sd_b)
    assert set(la) == set(lb)
    for k in la:
        assert torch.equal(la[k].down, lb[k].down), k
        ua, ub = la[k].up.double() * la[k].scale, lb[k].up.double() * lb[k].scale
        assert torch.allclose(ua, ub, rtol=rtol, atol=rtol * float(ua.abs().max())), k


@st.composite
def lora_over(draw, arch):
    """A LoRA over a random subset (1..6 layers) of one model (a UNet plus its text encoders)."""
    te = {"sd15": ["clip-l"], "sd2": ["openclip-h"], "sdxl": ["clip-l", "openclip-bigg"]}[arch]
    pool = [(F.UNET_PREFIX, m, s) for m, s in unet_layers(arch).items()]
    for t in te:
        prefix = "lora_te2_" if t == "openclip-bigg" else F.TE_PREFIX
        pool += [(prefix, m, s) for m, s in clip_layers(t).items()]
    idx = draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=6, unique=True))
    chosen = [pool[i] for i in idx]
    ranks = draw(st.lists(st.integers(1, 4), min_size=len(chosen), max_size=len(chosen)))
    alphas = draw(st.lists(st.sampled_from([1.0, 2.0, 4.0, 8.0, 0.5, 3.0]), min_size=len(chosen), max_size=len(chosen)))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return _kohya_sd(chosen, ranks, alphas, dtype, draw(st.integers(0, 2 ** 31 - 1)))


def _known(arch):
    te = {"sd15": ["clip-l"], "sd2": ["openclip-h"], "sdxl": ["clip-l", "openclip-bigg"]}[arch]
    text = set()
    for t in te:
        text |= set(clip_layers(t))
    return list(unet_layers(arch)), sorted(text)


@pytest.mark.parametrize("arch", list(UNET_CONFIGS))
@PROP
@given(data=st.data())
def test_kohya_peft_kohya_round_trip(arch, data):
    sd = data.draw(lora_over(arch))
    unet_known, te_known = _known(arch)
    for known in ((unet_known, te_known), (None, None)):
        peft = F.kohya_to_diffusers(sd, *known)
        assert F.detect_format(peft) == F.PEFT
        back = F.to_kohya(peft)
        names = {k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_down.weight")}
        assert {k.rsplit(".", 2)[0] for k in back if k.endswith(".lora_down.weight")} == names
        # the scale is folded into lora_B in the factors' dtype: one rounding of up * alpha / r
        _assert_same(sd, back, rtol=torch.finfo(next(iter(sd.values())).dtype).eps)
        # and back again: the PEFT keys are stable
        assert set(F.kohya_to_diffusers(back, *known)) == set(peft)


@pytest.mark.parametrize("arch", list(UNET_CONFIGS))
@PROP
@given(data=st.data())
def test_diffusers_old_spelling_reads_to_the_same_layers(arch, data):
    sd = data.draw(lora_over(arch))
    peft = F.kohya_to_diffusers(sd, *_known(arch))
    unet_only = {k: v for k, v in peft.items() if k.startswith("unet.")}
    if not unet_only:
        return
    old = {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
           for k, v in unet_only.items()}
    assert F.detect_format(old) == F.DIFFUSERS_OLD
    assert F.to_kohya(old).keys() == F.to_kohya(unet_only).keys()
    _assert_same(F.to_kohya(old), F.to_kohya(unet_only), rtol=1e-12)


@pytest.mark.parametrize("arch", list(UNET_CONFIGS))
def test_every_layer_of_the_model_round_trips_and_agrees_with_diffusers(arch):
    """All UNet and text-encoder layers at once (1 x 1 stand-in factors: only the names matter here)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    unet_known, te_known = _known(arch)
    layers = [(F.UNET_PREFIX, m, (1, 1)) for m in unet_known]
    te = {"sd15": ["clip-l"], "sd2": ["openclip-h"], "sdxl": ["clip-l", "openclip-bigg"]}[arch]
    for t in te:
        prefix = "lora_te2_" if t == "openclip-bigg" else F.TE_PREFIX
        layers += [(prefix, m, (1, 1)) for m in clip_layers(t)]
    sd = _kohya_sd(layers, [1] * len(layers), [1.0] * len(layers), torch.float32, 0)
    for known in ((unet_known, te_known), (None, None)):
        peft = F.kohya_to_diffusers(sd, *known)
        assert len(peft) == 2 * len(layers)
        assert set(F.to_kohya(peft)) == set(sd)
    # diffusers' converter names the first text encoder lora_te1_ (the pack reads that as lora_te_)
    theirs = {k.replace("lora_te1_", "lora_te_") for k in convert_state_dict_to_kohya(peft)}
    assert theirs == set(sd)


def test_sdxl_text_encoder_prefixes():
    """lora_te1_ (SDXL's CLIP-L, kohya's spelling) reads as lora_te_; lora_te2_ stays; both reach the right
    diffusers text encoder."""
    m = "text_model.encoder.layers.5.self_attn.k_proj"
    sd = {f"lora_te1_{m.replace('.', '_')}.lora_down.weight": torch.ones(1, 4),
          f"lora_te1_{m.replace('.', '_')}.lora_up.weight": torch.ones(4, 1),
          f"lora_te2_{m.replace('.', '_')}.lora_down.weight": torch.ones(1, 4),
          f"lora_te2_{m.replace('.', '_')}.lora_up.weight": torch.ones(4, 1),
          "lora_te2_text_projection.lora_down.weight": torch.ones(1, 4),
          "lora_te2_text_projection.lora_up.weight": torch.ones(4, 1)}
    k = F.to_kohya(sd)
    assert f"lora_te_{m.replace('.', '_')}.alpha" in k and f"lora_te2_{m.replace('.', '_')}.alpha" in k
    peft = F.kohya_to_diffusers(k)
    assert {x.rsplit(".", 2)[0] for x in peft} == {f"text_encoder.{m}", f"text_encoder_2.{m}",
                                                   "text_encoder_2.text_projection"}
    assert set(F.to_kohya(peft)) == set(k)


@PROP
@given(st.sampled_from([torch.float16, torch.bfloat16]), st.floats(1.0, 60000.0), st.integers(1, 4),
       st.floats(0.5, 2 ** 20))
def test_folding_alpha_never_writes_inf(dtype, magnitude, rank, alpha):
    """kohya_to_diffusers folds alpha / r into lora_B in lora_B's dtype: the result is the exact scaled factor
    rounded once, or, when that leaves the dtype's range, a LoraFormatError naming the layer (before: inf)."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    up = torch.full((3, rank), magnitude).to(dtype)
    sd = {f"{name}.lora_down.weight": torch.ones(rank, 2, dtype=dtype), f"{name}.lora_up.weight": up,
          f"{name}.alpha": torch.tensor(alpha)}
    exact = up.double() * (alpha / rank)
    if float(exact.abs().max()) > torch.finfo(dtype).max:
        with pytest.raises(F.LoraFormatError, match=f"{name}: .*exceeds the range"):
            F.kohya_to_diffusers(sd)
        return
    b = F.kohya_to_diffusers(sd)["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"]
    assert torch.isfinite(b).all()
    assert torch.allclose(b.double(), exact, rtol=torch.finfo(dtype).eps, atol=0)
