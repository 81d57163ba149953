"""Non-finite and out-of-range values never pass a MemoRa node silently (issue 17, item 3), through ComfyUI's own
executor: NaN typed into a widget (ComfyUI's range check lets NaN through), a value arriving through a link (ComfyUI
checks no range there), and LoRA files holding NaN / inf."""

from __future__ import annotations

import math

import pytest
import torch

from graphs import Graph
from random_loras import lora_targets, pack_module, random_kohya_lora, write_lora

SHORT_TERM_CURVE = '{"steps": [10, 50, 250], "score": [0.05, 0.7, 0.8], "similarity": [0.2, 0.6, 0.65]}'


@pytest.fixture(scope="module")
def loras(comfy, loaded_tiny, comfy_base):
    """A good LoRA for the tiny model and two copies poisoned with inf / NaN, in models/loras."""
    model = loaded_tiny[0]
    good = random_kohya_lora(lora_targets(model), rank=2, seed=5)
    folder = comfy_base / "models" / "loras"
    names = {"good": write_lora(folder, "nonfinite_good.safetensors", good)}
    keys = sorted(k for k in good if k.endswith(".lora_up.weight"))
    for kind, value in (("inf", math.inf), ("nan", math.nan)):
        bad = {k: v.clone() for k, v in good.items()}
        bad[keys[1]][0, 0] = value   # the first bad key in the file (safetensors stores keys sorted)
        names[kind] = write_lora(folder, f"nonfinite_{kind}.safetensors", bad)
    names["bad_key"] = keys[1]
    return names


def _sampling_graph(tiny_ckpt, node: str, cfg) -> Graph:
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    pos = g.node("CLIPTextEncode", clip=ck[1], text="a photo of the parachute")
    neg = g.node("CLIPTextEncode", clip=ck[1], text="")
    latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    inputs = dict(model=ck[0], positive=pos[0], negative=neg[0], latent=latent[0], steps=4, start_at_step=2, cfg=cfg,
                  schedule="exact")
    if node == "MemoRaDDIMInversion":
        inputs["refine_iterations"] = 0
    out = g.node(node, node_id="target", **inputs)
    g.node("PreviewAny", source=out[0])
    return g


def _assert_refused(res, node_id: str, *needles: str):
    assert not res.success, "the graph ran: the bad value passed silently"
    assert res.error.get("node_id") == node_id, res.error
    msg = res.error_message
    for needle in needles:
        assert needle in msg, msg


# -- Float inputs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("node", ["MemoRaDDIMInversion", "MemoRaRegenerate"])
def test_nan_cfg_is_refused_naming_node_input_value_and_range(comfy, tiny_ckpt, node):
    """NaN cfg used to give NaN latents with no error (ComfyUI's `val < min` check is false for NaN)."""
    res = comfy.run(_sampling_graph(tiny_ckpt, node, math.nan).prompt)
    _assert_refused(res, "target", "FloatInputError", f"({node})", "input 'cfg' is nan (not a finite number)",
                    "allowed: a finite number in [0, 100]")


@pytest.mark.parametrize("node", ["MemoRaDDIMInversion", "MemoRaRegenerate"])
def test_finite_cfg_still_runs(comfy, tiny_ckpt, node):
    res = comfy.run(_sampling_graph(tiny_ckpt, node, 3.0).prompt)
    assert res.success, res.error_message
    assert torch.isfinite(comfy.node_outputs("target")[0]["samples"]).all()


@pytest.mark.parametrize("value, what", [(150.0, "150.0 (out of range)"), (-0.5, "-0.5 (out of range)"),
                                         (math.nan, "nan (not a finite number)")])
def test_value_arriving_through_a_link_is_checked(comfy, tiny_ckpt, value, what):
    """ComfyUI checks min / max only for widget values: 150 from a primitive node reached cfg (max 100) unchecked
    (the primitive's own range is +-sys.maxsize, and NaN passes its check)."""
    g = _sampling_graph(tiny_ckpt, "MemoRaDDIMInversion", 7.5)
    prim = g.node("PrimitiveFloat", node_id="prim", value=value)
    g.prompt["target"]["inputs"]["cfg"] = prim[0]
    res = comfy.run(g.prompt)
    _assert_refused(res, "target", f"input 'cfg' is {what}", "[0, 100]")


def _verdict_graph(close_similarity) -> Graph:
    g = Graph()
    g.node("MemoRaForgettingVerdict", node_id="verdict", curve=SHORT_TERM_CURVE, similarity_metric="ssim",
           recovered=0.5, partial=0.1, quick_steps=100, close_similarity=close_similarity, reference_score=1.0,
           baseline_score=0.0)
    return g


def test_forgetting_verdict_nan_close_similarity_is_refused(comfy):
    """NaN close_similarity used to flip this curve's verdict from short-term to long-term."""
    ok = comfy.run(_verdict_graph(0.5).prompt)
    assert ok.success, ok.error_message
    assert comfy.node_outputs("verdict")[0] == "short-term"
    res = comfy.run(_verdict_graph(math.nan).prompt)
    _assert_refused(res, "verdict", "(MemoRaForgettingVerdict)", "input 'close_similarity' is nan",
                    "[-1, 1000]")


def test_nan_lora_strength_is_refused(comfy, tiny_ckpt, loras):
    """NaN lora_strength used to patch the model with NaN (NaN latents downstream, no error)."""
    g = Graph()
    node = g.node("MemoRaLoadUnlearnedModel", node_id="loader", ckpt_name=tiny_ckpt,
                  unlearned_weights=f"loras/{loras['good']}", lora_strength=math.nan)
    g.node("PreviewAny", source=node[3])
    res = comfy.run(g.prompt)
    _assert_refused(res, "loader", "(MemoRaLoadUnlearnedModel)", "input 'lora_strength' is nan", "[-10, 10]")


def test_every_float_input_of_every_node_is_checked(comfy):
    """Each registered MemoRa node derives from MemoRaNode, and each of its Float inputs is refused when NaN or
    beyond its declared max, before the node does anything (the other inputs are not even looked at)."""
    from comfy_api.latest import io

    schema_mod = pack_module("nodes._schema")
    checked = 0
    for cls in pack_module("nodes").node_classes():
        assert issubclass(cls, schema_mod.MemoRaNode), cls
        inputs = cls.define_schema().inputs
        floats = [i for i in inputs if isinstance(i, io.Float.Input)]
        for f in floats:
            for bad in (math.nan, f.max + 1.0, f.min - 1.0):
                kwargs = {i.id: None for i in inputs}
                kwargs.update({x.id: x.default for x in floats})
                kwargs[f.id] = bad
                with pytest.raises(schema_mod.FloatInputError, match=rf"\({cls.__name__}\): input '{f.id}' is"):
                    cls.execute(**kwargs)
                checked += 1
    assert checked >= 3 * 17, checked   # 17 Float inputs across the pack today (the nudity threshold is a convention now)


# -- LoRA files with NaN / inf -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["inf", "nan"])
def test_load_lora_refuses_non_finite_file_naming_file_and_key(comfy, loras, kind):
    g = Graph()
    node = g.node("MemoRaLoadLoRA", node_id="load", lora_name=loras[kind])
    g.node("PreviewAny", source=node[1])
    res = comfy.run(g.prompt)
    _assert_refused(res, "load", f"{loras[kind]}: tensor '{loras['bad_key']}' holds non-finite values")


def test_unlearned_loader_refuses_non_finite_lora_file(comfy, tiny_ckpt, loras):
    g = Graph()
    node = g.node("MemoRaLoadUnlearnedModel", node_id="loader", ckpt_name=tiny_ckpt,
                  unlearned_weights=f"loras/{loras['inf']}", lora_strength=1.0)
    g.node("PreviewAny", source=node[3])
    res = comfy.run(g.prompt)
    _assert_refused(res, "loader", f"{loras['inf']}: tensor '{loras['bad_key']}' holds non-finite values (0 NaN, 1 inf")


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_merge_graph_with_a_nan_lora_file_names_file_and_key(comfy, loras, method):
    """Load LoRA -> Multi-LoRA Merge: concat used to carry the NaN into the merge, svd to fail inside torch.linalg
    naming neither file nor layer; now the file is refused where it is read."""
    g = Graph()
    a = g.node("MemoRaLoadLoRA", node_id="a", lora_name=loras["good"])
    b = g.node("MemoRaLoadLoRA", node_id="b", lora_name=loras["nan"])
    m = g.node("MemoRaMultiLoRAMerge", node_id="merge", lora_1=a[0], weight_1=1.0, lora_2=b[0], weight_2=1.0,
               lora_3=None, weight_3=1.0, lora_4=None, weight_4=1.0, method=method, rank=0, density=0.5, seed=0,
               save_name="")
    g.prompt["merge"]["inputs"] = {k: v for k, v in g.prompt["merge"]["inputs"].items() if v is not None}
    g.node("PreviewAny", source=m[1])
    res = comfy.run(g.prompt)
    _assert_refused(res, "b", f"{loras['nan']}: tensor '{loras['bad_key']}' holds non-finite values (1 NaN, 0 inf")


@pytest.mark.parametrize("method", ["concat", "svd", "ties"])
def test_merge_node_refuses_non_finite_lora_model_naming_slot_and_key(comfy, loras, comfy_base, method):
    """A LORA_MODEL holding NaN that did not come from a file (e.g. a diverged training): the merge node names the
    input slot and the first bad key, for every method."""
    from safetensors.torch import load_file

    folder = comfy_base / "models" / "loras"
    good, bad = load_file(str(folder / loras["good"])), load_file(str(folder / loras["nan"]))
    merge_node = comfy.node_class("MemoRaMultiLoRAMerge")
    with pytest.raises(ValueError) as e:
        merge_node.execute(lora_1=good, weight_1=1.0, method=method, rank=0, density=0.5, seed=0, save_name="",
                           lora_2=bad, weight_2=0.5)
    assert str(e.value).startswith(f"lora_2: tensor '{loras['bad_key']}' holds non-finite values"), str(e.value)


def test_a_float_input_without_a_finite_range_is_refused_when_the_schema_is_built(comfy):
    """The check needs a range to check against: a new node declaring a Float input without one fails at once."""
    from comfy_api.latest import io

    schema_mod = pack_module("nodes._schema")

    class MemoRaUnrangedNode(schema_mod.MemoRaNode):
        """A node whose Float input has no max."""

        @classmethod
        def define_schema(cls):
            return schema_mod.node(cls, "unranged", inputs=[io.Float.Input("x", default=1.0, min=0.0)])

        @classmethod
        def execute(cls, x):
            return io.NodeOutput()

    with pytest.raises(TypeError, match="MemoRaUnrangedNode: Float input 'x' must declare a finite min and max"):
        MemoRaUnrangedNode.define_schema()
