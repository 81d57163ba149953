"""Cancelling a MemoRa node (ComfyUI's interrupt; a BaseException on 0.33) leaves models intact and writes nothing."""

from __future__ import annotations

import torch

from graphs import Graph


def _graph(tiny_ckpt, interrupt_after=None, prefix="interrupt_probe"):
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    model = ck[0]
    if interrupt_after is not None:
        model = g.node("MemoRaTest_InterruptAfterCalls", model=ck[0], calls=interrupt_after)[0]
    pos = g.node("CLIPTextEncode", text="a photo of the parachute", clip=ck[1])
    neg = g.node("CLIPTextEncode", text="", clip=ck[1])
    lat = g.node("KSampler", model=ck[0], positive=pos[0], negative=neg[0],
                 latent_image=g.node("EmptyLatentImage", width=64, height=64, batch_size=2)[0],
                 seed=11, steps=3, cfg=2.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    inv = g.node("MemoRaDDIMInversion", model=model, positive=pos[0], negative=neg[0], latent=lat[0], steps=12,
                 start_at_step=2, cfg=2.0, refine_iterations=1, schedule="exact")
    rg = g.node("MemoRaRegenerate", model=ck[0], positive=pos[0], negative=neg[0], latent=inv[0], steps=12,
                start_at_step=2, cfg=2.0, schedule="exact")
    g.node("SaveImage", images=g.node("VAEDecode", samples=rg[0], vae=ck[2])[0], filename_prefix=prefix)
    return g, ck, rg


def _unet_fingerprint(model):
    sd = model.model.diffusion_model.state_dict()
    return {k: v.detach().clone() for k, v in sd.items()}


def test_interrupted_inversion_leaves_model_untouched_and_writes_nothing(comfy, tiny_ckpt, output_dir):
    import comfy.model_management as mm

    g, ck, rg = _graph(tiny_ckpt)
    first = comfy.run(g.prompt)
    assert first.success, first.error
    reference = comfy.node_outputs(rg.id)[0]["samples"].clone()
    model = comfy.node_outputs(ck.id)[0]
    before = _unet_fingerprint(model)

    g2, _, _ = _graph(tiny_ckpt, interrupt_after=4, prefix="interrupted_probe")
    res = comfy.run(g2.prompt)
    assert not res.success
    assert res.error and res.error["event"] == "execution_interrupted", res.error
    assert not list(output_dir.glob("interrupted_probe*")), "an interrupted run must not write images"
    mm.interrupt_current_processing(False)

    after = _unet_fingerprint(comfy.node_outputs(ck.id)[0] or model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The same graph, run again, gives bit-identical latents: nothing in the loaded model was changed.
    again = comfy.run(_graph(tiny_ckpt, prefix="after_interrupt")[0].prompt)
    assert again.success, again.error
    assert torch.equal(comfy.node_outputs(rg.id)[0]["samples"], reference)
