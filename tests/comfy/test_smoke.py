from graphs import Graph


def test_tiny_checkpoint_loads_and_pack_nodes_registered(comfy, tiny_ckpt):
    import nodes

    for node_id in ("MemoRaDDIMInversion", "MemoRaSlerpLatents", "MemoRaRegenerate"):
        assert node_id in nodes.NODE_CLASS_MAPPINGS, node_id
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    pos = g.node("CLIPTextEncode", text="a photo of the parachute", clip=ck[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=2)
    ks = g.node("KSampler", model=ck[0], positive=pos[0], negative=pos[0], latent_image=lat[0], seed=1, steps=2,
                cfg=2.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
    dec = g.node("VAEDecode", samples=ks[0], vae=ck[2])
    g.node("SaveImage", images=dec[0], filename_prefix="smoke")
    res = comfy.run(g.prompt)
    assert res.success, res.error
    out = comfy.node_outputs(ks.id)[0]["samples"]
    assert out.shape == (2, 4, 8, 8)
