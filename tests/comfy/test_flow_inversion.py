"""MemoRa on flow-matching models (issue 23), on the tiny Flux dev / schnell of tests/support/tiny_flux.py, through
ComfyUI's own loaders, text encoders, FluxGuidance, model sampling (with its shift) and executor:

- refined flow inversion + MemoRa Flow Regenerate give back the clean latents to <= 1e-5 (relative L2);
- the stock SamplerCustomAdvanced (euler, DisableNoise, BasicScheduler 'simple' split at start_at_step by
  SplitSigmas) and KSamplerAdvanced (euler / simple, add_noise disable) continue the inverted latent exactly as MemoRa
  Flow Regenerate does: Flux dev with its distilled guidance (FluxGuidance, one call per step), Flux dev with true
  CFG under the stock ModelSamplingFlux node (another shift), Flux schnell (discrete flow, shift 1), and discrete
  flow with SD3's shift 3 (the stock ModelSamplingSD3 node);
- ComfyUI's sigma ladder is memora.flow's shifted ladder (so the maths in docs/flux.md is what runs);
- bad input gets specific errors, before anything runs."""

from __future__ import annotations

import pytest
import torch

from graphs import Graph

STEPS, START, REFINE = 10, 3, 4
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159  # ComfyUI's latent_formats.Flux (process_in: (x - shift) * scale)
PROMPT = "a photo of the parachute"


@pytest.fixture(scope="module")
def flux(comfy, comfy_base):
    import tiny_flux

    files = {v: tiny_flux.install_tiny_flux(comfy_base, v) for v in tiny_flux.VARIANTS}
    g = torch.Generator().manual_seed(2024)
    x0 = torch.randn(2, 16, 8, 8, generator=g) / FLUX_SCALE + FLUX_SHIFT  # unit variance in model space
    return {"files": files, "x0": x0}


def _latent_file(comfy_base, name, samples):
    from safetensors.torch import save_file

    path = comfy_base / "input" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latent_tensor": samples.contiguous(), "latent_format_version_0": torch.tensor([])}, str(path))
    return name


def _rel(a, b):
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm())


#: the stock nodes that re-shift a model's schedule: ModelSamplingFlux (Flux's shift from the image size) and
#: ModelSamplingSD3 (discrete flow, SD3's time shift 3 and timestep multiplier 1000, on the dev transformer here)
SHIFT_NODES = {"flux": ("ModelSamplingFlux", dict(max_shift=2.0, base_shift=0.5, width=64, height=64)),
               "sd3": ("ModelSamplingSD3", dict(shift=3.0))}
CASES = {  # name: (variant, cfg, true_cfg, FluxGuidance value or None, shift node or None, all checks)
    "dev_distilled": ("dev", 1.0, False, 3.5, None, True),
    "dev_true_cfg_shift_node": ("dev", 2.5, True, 1.0, "flux", False),
    "schnell": ("schnell", 1.0, False, None, None, True),
    "dev_discrete_flow_shift3": ("dev", 1.0, False, 3.5, "sd3", False),
}


def _graph(flux, comfy_base, case):
    variant, cfg, true_cfg, guidance, shift_node, full = CASES[case]
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=flux["files"][variant]["checkpoint"])
    model = ck[0]
    if shift_node:
        node_type, settings = SHIFT_NODES[shift_node]
        model = g.node(node_type, model=ck[0], **settings)[0]
    pos = g.node("CLIPTextEncode", clip=ck[1], text=PROMPT)[0]
    if guidance is not None:
        pos = g.node("FluxGuidance", conditioning=pos, guidance=guidance)[0]
    neg = g.node("CLIPTextEncode", clip=ck[1], text="")[0] if true_cfg else None
    lat = g.node("LoadLatent", latent=_latent_file(comfy_base, f"memora_flux_{case}.latent", flux["x0"]))
    common = dict(model=model, positive=pos, steps=STEPS, start_at_step=START, scheduler="simple", cfg=cfg,
                  true_cfg=true_cfg, **({"negative": neg} if neg is not None else {}))
    inv = g.node("MemoRaFlowInversion", latent=lat[0], refine_iterations=REFINE, **common)
    reg = g.node("MemoRaFlowRegenerate", latent=inv[0], **common)
    if true_cfg:
        guider = g.node("CFGGuider", model=model, positive=pos, negative=neg, cfg=cfg)
    else:
        guider = g.node("BasicGuider", model=model, conditioning=pos)
    sched = g.node("BasicScheduler", model=model, scheduler="simple", steps=STEPS, denoise=1.0)
    split = g.node("SplitSigmas", sigmas=sched[0], step=START)
    stock = g.node("SamplerCustomAdvanced", noise=g.node("DisableNoise")[0], guider=guider[0],
                   sampler=g.node("KSamplerSelect", sampler_name="euler")[0], sigmas=split[1], latent_image=inv[0])
    outs = {"latent": lat, "inverted": inv, "regenerated": reg, "stock": stock}
    if full:  # plain Euler inversion for comparison, and the stock KSamplerAdvanced (its negative unused at cfg 1)
        inv0 = g.node("MemoRaFlowInversion", latent=lat[0], refine_iterations=0, **common)
        outs["regenerated_unrefined"] = g.node("MemoRaFlowRegenerate", latent=inv0[0], **common)
        outs["ksampler_advanced"] = g.node(
            "KSamplerAdvanced", model=model, add_noise="disable", noise_seed=0, steps=STEPS, cfg=cfg,
            sampler_name="euler", scheduler="simple", positive=pos, negative=pos, latent_image=inv[0],
            start_at_step=START, end_at_step=10000, return_with_leftover_noise="disable")
    for ref in outs.values():
        g.node("PreviewAny", source=ref[0])
    return g, outs


@pytest.mark.parametrize("case", list(CASES))
def test_refined_inversion_reconstructs_and_stock_euler_continues_it(comfy, flux, comfy_base, case):
    g, outs = _graph(flux, comfy_base, case)
    res = comfy.run(g.prompt)
    assert res.success, res.error
    got = {k: comfy.node_outputs(ref.id)[0]["samples"] for k, ref in outs.items()}
    x0 = got["latent"]
    assert got["inverted"].shape == x0.shape and not torch.allclose(got["inverted"], x0, atol=1e-2)
    err = _rel(got["regenerated"], x0)
    err0 = _rel(got["regenerated_unrefined"], x0) if "regenerated_unrefined" in got else float("nan")
    stock_keys = [k for k in ("stock", "ksampler_advanced") if k in got]
    diffs = {k: float((got[k] - got["regenerated"]).abs().max() / x0.abs().max()) for k in stock_keys}
    plain = f"refine 0 {err0:.2e}, " if "regenerated_unrefined" in got else ""
    print(f"{case}: reconstruction rel. error {plain}refine {REFINE} {err:.2e}; stock vs Regenerate "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert err <= 1e-5
    if "regenerated_unrefined" in got:
        assert err < err0
    assert all(v <= 1e-6 for v in diffs.values()), diffs


# -- ComfyUI's ladder is memora.flow's ---------------------------------------------------------------------------
def _load(flux, variant):
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(flux["files"][variant]["checkpoint"])[:3]


def test_comfyuis_sigma_ladders_are_the_shifted_flow_times(comfy, flux):
    """The sigmas the nodes (and BasicScheduler) use are the rectified-flow times shifted as docs/flux.md says:
    Flux dev t' = e^mu / (e^mu + 1/t - 1) with mu = the model's shift (1.15 by default), schnell's discrete flow
    t' = s t / (1 + (s - 1) t) with s = 1, and the 'simple' scheduler takes them at an even stride."""
    import comfy.samplers
    from memora import flow

    for variant in ("dev", "schnell"):
        model = _load(flux, variant)[0]
        ms = model.get_model_object("model_sampling")
        n = len(ms.sigmas)
        t = torch.arange(1, n + 1, dtype=torch.float64) / n
        if variant == "dev":
            expected = [flow.flux_shift(float(x), ms.shift) for x in t]
            assert [flow.discrete_flow_shift(float(x), torch.e ** ms.shift) for x in t[:50]] == pytest.approx(
                expected[:50], abs=1e-12)
        else:
            expected = [flow.discrete_flow_shift(float(x), ms.shift) for x in t]
        assert ms.sigmas.double().tolist() == pytest.approx(expected, abs=1e-6)
        ours = flow.simple_ladder(ms.sigmas.tolist(), STEPS)
        assert comfy.samplers.calculate_sigmas(ms, "simple", STEPS).tolist() == pytest.approx(ours, abs=1e-7)


# -- bad input -----------------------------------------------------------------------------------------------------
def _call(node, model, pos, latent, neg=None, cfg=1.0, true_cfg=False, start=START, **kw):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[node]
    args = dict(model=model, positive=pos, latent=latent, steps=STEPS, start_at_step=start, scheduler="simple",
                cfg=cfg, true_cfg=true_cfg, **kw)
    if node == "MemoRaFlowInversion":
        args.setdefault("refine_iterations", 0)
    if neg is not None:
        args["negative"] = neg
    with torch.inference_mode():
        return cls.execute(**args)[0]


def test_bad_input_is_refused_with_specific_errors(comfy, flux, loaded_tiny):
    import nodes

    dev, clip, _ = _load(flux, "dev")
    schnell = _load(flux, "schnell")[0]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    guided = nodes.NODE_CLASS_MAPPINGS["FluxGuidance"]().append(pos, 3.5)[0]
    latent = {"samples": flux["x0"].clone()}
    model_calls = {"n": 0}

    def counting(apply_model, args):
        model_calls["n"] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])

    dev = dev.clone()
    dev.set_model_unet_function_wrapper(counting)
    for node in ("MemoRaFlowInversion", "MemoRaFlowRegenerate"):
        # cfg that Flux dev (guidance-distilled) would not use as asked: cfg != 1 without true CFG
        with pytest.raises(ValueError, match=r"cfg 3 on a flux-dev model: Flux is guidance-distilled.*FluxGuidance.*"
                                             r"true_cfg"):
            _call(node, dev, guided, latent, neg=pos, cfg=3.0)
        with pytest.raises(ValueError, match="true_cfg is on but cfg is 1"):
            _call(node, dev, guided, latent, neg=pos, true_cfg=True)
        with pytest.raises(ValueError, match="a negative conditioning is connected but cfg is 1"):
            _call(node, dev, guided, latent, neg=pos)
        with pytest.raises(ValueError, match="cfg 2.5 needs the negative conditioning"):
            _call(node, dev, guided, latent, cfg=2.5, true_cfg=True)
        # a dev-only option on schnell: FluxGuidance's distilled guidance
        with pytest.raises(ValueError, match=r"positive \(entry 0\) carries a distilled guidance of 3.5 "
                                             r"\(FluxGuidance\), but this is a Flux schnell model"):
            _call(node, schnell, guided, latent)
        # another family's text encoder, conditioning without Flux's pooled CLIP-L output
        sd_model, sd_clip, _ = loaded_tiny
        sd_pos = sd_clip.encode_from_tokens_scheduled(sd_clip.tokenize(PROMPT))
        with pytest.raises(ValueError, match="768-wide text embeddings but this Flux model reads 64-wide T5"):
            _call(node, dev, [[torch.zeros(1, 8, 768), {"pooled_output": torch.zeros(1, 64)}]], latent)
        with pytest.raises(ValueError, match="no pooled_output; Flux needs the 64-wide pooled CLIP-L"):
            _call(node, dev, [[pos[0][0], {}]], latent)
        # the start at t = 1, an SD model, a 4-channel latent
        with pytest.raises(ValueError, match=r"start_at_step 0 starts at flow time t = 1, pure noise"):
            _call(node, dev, guided, latent, start=0)
        with pytest.raises(ValueError, match=r"does not support this model.*DDIM-family.*use MemoRa DDIM Inversion"):
            _call(node, sd_model, sd_pos, latent)
        with pytest.raises(ValueError, match="has 4 channels but this model works on 16-channel latents"):
            _call(node, dev, guided, {"samples": torch.zeros(1, 4, 8, 8)})
    assert model_calls["n"] == 0  # every refusal came before any model call
    assert torch.equal(latent["samples"], flux["x0"])
    # and the SD nodes refuse a flow model, pointing to these
    ddim = nodes.NODE_CLASS_MAPPINGS["MemoRaDDIMInversion"]
    with pytest.raises(ValueError, match="use MemoRa Flow Inversion and MemoRa Flow Regenerate"):
        ddim.execute(dev, guided, guided, latent, STEPS, START, 1.0, 0, "exact")
