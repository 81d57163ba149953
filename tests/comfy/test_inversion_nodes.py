"""The inversion half of MemoRa on the tiny SD1.x model, through ComfyUI's own machinery."""

from __future__ import annotations

import pytest
import torch

from graphs import Graph

STEPS, START = 20, 10


def _encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


@pytest.fixture(scope="module")
def setup(loaded_tiny):
    model, clip, vae = loaded_tiny
    pos = _encode(clip, "a photo of the parachute")
    neg = _encode(clip, "")
    g = torch.Generator().manual_seed(1234)
    # Clean latents in ComfyUI's unscaled VAE space (unit variance once scaled by 0.18215).
    x0 = torch.randn(3, 4, 8, 8, generator=g) / 0.18215
    return model, pos, neg, {"samples": x0}


def _nodes():
    import nodes

    m = nodes.NODE_CLASS_MAPPINGS
    return m["MemoRaDDIMInversion"], m["MemoRaRegenerate"], m["MemoRaSlerpLatents"], m["KSamplerAdvanced"]


def _invert(model, pos, neg, latent, cfg, refine=0, schedule="exact", steps=STEPS, start=START):
    inv = _nodes()[0]
    with torch.inference_mode():
        return inv.execute(model, pos, neg, latent, steps, start, cfg, refine, schedule)[0]


def _regen(model, pos, neg, latent, cfg, schedule="exact", steps=STEPS, start=START):
    regen = _nodes()[1]
    with torch.inference_mode():
        return regen.execute(model, pos, neg, latent, steps, start, cfg, schedule)[0]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_inversion_regeneration_reconstructs(setup, cfg):
    model, pos, neg, latent = setup
    _, _, _, ksa = _nodes()
    errors = {}
    for refine in (0, 3):
        inverted = _invert(model, pos, neg, latent, cfg, refine)
        assert inverted["samples"].shape == latent["samples"].shape
        rec = _regen(model, pos, neg, inverted, cfg)["samples"]
        with torch.inference_mode():
            stock = ksa().sample(model, "disable", 0, STEPS, cfg, "ddim", "ddim_uniform", pos, neg, inverted,
                                 START, 10000, "disable")[0]["samples"]
        errors[refine] = (_rel(rec, latent["samples"]), _rel(stock, latent["samples"]))
    print(f"cfg={cfg}: reconstruction rel. error (Regenerate, stock KSamplerAdvanced): "
          f"refine 0 -> {errors[0][0]:.2e}, {errors[0][1]:.2e}; refine 3 -> {errors[3][0]:.2e}, {errors[3][1]:.2e}")
    assert errors[0][0] <= 1e-2 and errors[0][1] <= 1e-2
    assert errors[3][0] <= 1e-5 and errors[3][1] <= 1e-5
    assert errors[3][0] < errors[0][0]


def test_exact_regeneration_matches_diffusers_ddim_scheduler(setup, tiny_ckpt_path):
    from diffusers import DDIMScheduler

    import tiny_models

    model, pos, neg, _ = setup
    cfg, steps, start = 3.0, 20, 5
    g = torch.Generator().manual_seed(99)
    x_ve = torch.randn(2, 4, 8, 8, generator=g) * 4.0  # a noisy latent at the start sigma (model space)
    ours = _regen(model, pos, neg, {"samples": x_ve / 0.18215}, cfg, steps=steps, start=start)["samples"] * 0.18215

    unet = tiny_models.diffusers_unet_from_checkpoint(tiny_ckpt_path)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading", num_train_timesteps=1000)
    sched.set_timesteps(steps)
    ts = sched.timesteps[start:]
    ab = sched.alphas_cumprod
    lat = x_ve * ab[int(ts[0])].sqrt()  # VP latent at the first timestep
    cond = pos[0][0].repeat(2, 1, 1)
    unc = neg[0][0].repeat(2, 1, 1)
    with torch.no_grad():
        for t in ts:
            e = unet(torch.cat([lat, lat]), t, encoder_hidden_states=torch.cat([unc, cond])).sample
            eu, ec = e.chunk(2)
            lat = sched.step(eu + cfg * (ec - eu), t, lat, eta=0.0).prev_sample
    err = _rel(ours, lat)
    print(f"exact regeneration vs diffusers DDIMScheduler: rel. error {err:.2e}")
    assert err <= 1e-4


def test_reference_schedule_round_trip_and_continuation(setup):
    """The reference schedule keeps the latent one step less noisy than where it restarts (its off-by-one), so it
    does not reconstruct exactly; its inverted latent must still feed Regenerate(reference) with the reference's
    arithmetic. Compare against memora's reference functions driven by the same ComfyUI model."""
    model, pos, neg, latent = setup
    inv = _invert(model, pos, neg, latent, 3.0, schedule="reference", steps=50, start=15)
    rec = _regen(model, pos, neg, inv, 3.0, schedule="reference", steps=50, start=15)["samples"]
    assert torch.isfinite(rec).all()
    exact = _regen(model, pos, neg, _invert(model, pos, neg, latent, 3.0, steps=50, start=15), 3.0,
                   steps=50, start=15)["samples"]
    e_ref, e_exact = _rel(rec, latent["samples"]), _rel(exact, latent["samples"])
    print(f"50 steps from 15: reconstruction error reference schedule {e_ref:.2e}, exact {e_exact:.2e}")
    assert e_exact < e_ref


def test_whole_batch_and_cfg_pair_in_one_model_call_per_step(setup):
    model, pos, neg, latent = setup
    calls = []
    m = model.clone()

    def wrapper(apply_model, args):
        calls.append(int(args["input"].shape[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(wrapper)
    _invert(m, pos, neg, latent, 3.0, refine=1)
    assert calls and all(c == 6 for c in calls), calls  # 3 latents x (cond, uncond)
    assert len(calls) == (STEPS - START) * 2  # one call per step and refinement
    calls.clear()
    _regen(m, pos, neg, latent, 1.0)
    assert calls == [3] * (STEPS - START)  # cfg 1: ComfyUI skips the unconditional half


def test_inputs_not_modified_and_other_keys_kept(setup):
    model, pos, neg, latent = setup
    before = latent["samples"].clone()
    lat = {"samples": latent["samples"], "batch_index": [0, 1, 2], "noise_mask": torch.ones(3, 1, 8, 8)}
    out = _invert(model, pos, neg, lat, 2.0)
    assert torch.equal(latent["samples"], before)
    assert out["batch_index"] == [0, 1, 2] and torch.equal(out["noise_mask"], lat["noise_mask"])


@pytest.mark.parametrize("case,message", [
    ("empty", "empty"),
    ("nan", "non-finite"),
    ("channels", "channels"),
    ("start", "start_at_step"),
])
def test_bad_inputs_rejected_before_work(setup, case, message):
    model, pos, neg, latent = setup
    calls = []
    m = model.clone()
    m.set_model_unet_function_wrapper(lambda f, a: calls.append(1) or f(a["input"], a["timestep"], **a["c"]))
    lat, start = latent, START
    if case == "empty":
        lat = {"samples": torch.zeros(0, 4, 8, 8)}
    elif case == "nan":
        s = latent["samples"].clone()
        s[0, 0, 0, 0] = float("nan")
        lat = {"samples": s}
    elif case == "channels":
        lat = {"samples": torch.zeros(2, 16, 8, 8)}
    elif case == "start":
        start = STEPS
    for fn in (_invert, _regen):
        with pytest.raises(ValueError, match=message):
            fn(m, pos, neg, lat, 2.0, steps=STEPS, start=start)
    assert calls == []


def test_slerp_node_pairs_masks_and_errors(comfy):
    slerp = _nodes()[2]
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ma, mb = torch.zeros(3, 8, 8), torch.ones(3, 8, 8)
    la = {"samples": a, "noise_mask": ma, "batch_index": [0, 1, 2]}
    out = slerp.execute(la, {"samples": b, "noise_mask": mb}, 10, True)[0]
    assert out["samples"].shape == (33, 4, 8, 8)
    assert torch.equal(out["samples"][11], a[1]) and torch.equal(out["samples"][21], b[1])
    assert out["noise_mask"].shape == (33, 8, 8) and float(out["noise_mask"][5].mean()) == pytest.approx(0.5)
    assert out["batch_index"][:3] == [0, 1, 2] and len(out["batch_index"]) == 33
    assert len(set(out["batch_index"])) == 33
    assert "noise_mask" in la and torch.equal(la["samples"], a)
    with pytest.raises(ValueError, match="batch sizes must match"):
        slerp.execute({"samples": a}, {"samples": b[:2]}, 10, True)
    with pytest.raises(ValueError, match="same shape"):
        slerp.execute({"samples": a}, {"samples": torch.randn(3, 4, 8, 16)}, 10, True)
    with pytest.raises(ValueError, match="empty"):
        slerp.execute({"samples": a[:0]}, {"samples": b[:0]}, 10, True)
    with pytest.raises(ValueError, match="non-finite"):
        slerp.execute({"samples": a * float("inf")}, {"samples": b}, 10, True)


def test_graph_runs_through_executor_and_errors_surface(comfy, tiny_ckpt):
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    pos = g.node("CLIPTextEncode", text="a photo of the parachute", clip=ck[1])
    neg = g.node("CLIPTextEncode", text="", clip=ck[1])
    lat = g.node("KSampler", model=ck[0], positive=pos[0], negative=neg[0],
                 latent_image=g.node("EmptyLatentImage", width=64, height=64, batch_size=2)[0],
                 seed=3, steps=3, cfg=2.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    inv = g.node("MemoRaDDIMInversion", model=ck[0], positive=pos[0], negative=neg[0], latent=lat[0], steps=10,
                 start_at_step=4, cfg=2.0, refine_iterations=0, schedule="exact")
    sl = g.node("MemoRaSlerpLatents", latent_a=inv[0], latent_b=inv[0], intervals=4, include_endpoints=True)
    rg = g.node("MemoRaRegenerate", model=ck[0], positive=pos[0], negative=neg[0], latent=sl[0], steps=10,
                start_at_step=4, cfg=2.0, schedule="exact")
    g.node("SaveImage", images=g.node("VAEDecode", samples=rg[0], vae=ck[2])[0], filename_prefix="memora_graph")
    res = comfy.run(g.prompt)
    assert res.success, res.error
    out = comfy.node_outputs(rg.id)[0]["samples"]
    assert out.shape == (10, 4, 8, 8) and torch.isfinite(out).all()
    # start_at_step >= steps: the executor reports the node's specific error.
    g.prompt[inv.id]["inputs"]["start_at_step"] = 10
    res = comfy.run(g.prompt)
    assert not res.success and "start_at_step" in res.error_message
