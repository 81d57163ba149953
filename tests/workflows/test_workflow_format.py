"""UI -> API conversion (comfy-cli's converter fed with in-process /object_info), the UI-graph builder's widget
positions, input addressing and the prompt-CSV convention. Conversion only: nothing here samples."""

from __future__ import annotations

import json

import pytest

from memora_batch import sweep as sw
from memora_build.uigraph import UIGraph, is_widget
from memora_batch.workflow import (AddressError, Workflow, WorkflowError, apply_overrides, graph_key,
                                   input_specs, object_info_in_process, resolve_address)


@pytest.fixture(scope="module")
def info(comfy):
    return object_info_in_process()


def _graph(info):
    g = UIGraph(info)
    ck = g.add("CheckpointLoaderSimple", "Unlearned model", ckpt_name="x.safetensors")
    rr = g.reroute(ck[0])
    rr2 = g.reroute(rr[0])
    pos = g.wire(g.add("CLIPTextEncode", "Concept prompt", text="a photo of the parachute"), clip=ck[1])
    neg = g.wire(g.add("CLIPTextEncode", "Neg.prompt v1.5", text=""), clip=ck[1])
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    up = g.wire(g.add("LatentUpscaleBy", "Bypassed upscale", mode=4, scale_by=2.0), samples=lat[0])
    ks = g.add("KSampler", "Sampler", seed=5, steps=3, cfg=2.5, sampler_name="ddim", scheduler="ddim_uniform")
    g.wire(ks, model=rr2[0], positive=pos[0], negative=neg[0], latent_image=up[0])
    steps = g.add("PrimitiveInt", "Steps", value=4)
    g.connect(steps[0], ks, "steps")  # a converted widget driven by a real (backend) primitive node
    g.primitive(1234, "Seed", (ks, "seed"))  # a front-end PrimitiveNode
    dec = g.wire(g.add("VAEDecode"), samples=ks[0], vae=ck[2])
    g.wire(g.add("SaveImage", "Save", filename_prefix="p"), images=dec[0])
    g.wire(g.add("SaveImage", "Muted save", mode=2, filename_prefix="m"), images=dec[0])
    g.note("a note")
    return g, {"ck": ck, "ks": ks, "lat": lat, "up": up, "steps": steps, "dec": dec}


def test_ui_to_api_handles_editor_only_and_disabled_nodes(info):
    g, n = _graph(info)
    wf = Workflow.load(g.to_json())
    assert wf.ui is not None and wf.api is None
    api = wf.to_api(info)
    types = sorted(v["class_type"] for v in api.values())
    # note, reroutes, PrimitiveNode, muted save and bypassed upscale are gone
    assert types == sorted(["CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode", "EmptyLatentImage",
                            "KSampler", "PrimitiveInt", "VAEDecode", "SaveImage"])
    ks = api[str(n["ks"].id)]["inputs"]
    assert ks["model"] == [str(n["ck"].id), 0]  # through two reroutes
    assert ks["latent_image"] == [str(n["lat"].id), 0]  # around the bypassed node
    assert ks["steps"] == [str(n["steps"].id), 0]  # converted widget keeps its link
    assert ks["seed"] == 1234  # PrimitiveNode value, control_after_generate entry skipped
    assert (ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["denoise"]) == (2.5, "ddim", "ddim_uniform", 1.0)
    assert wf.aliases["Seed"] == [(str(n["ks"].id), "seed")]
    assert api[str(n["ks"].id)]["_meta"]["title"] == "Sampler"


def test_api_format_and_prompt_wrapper_load_as_is(info, tmp_path):
    g, _ = _graph(info)
    api = Workflow.load(g.to_json()).to_api(info)
    for data in (api, {"prompt": api, "client_id": "x"}):
        p = tmp_path / "api.json"
        p.write_text(json.dumps(data))
        wf = Workflow.load(p)
        assert wf.ui is None and wf.to_api(info) == api
    p.write_text(json.dumps({"nodes": "nope"}))
    with pytest.raises(WorkflowError, match="neither a UI-format"):
        Workflow.load(p)


def test_builder_puts_every_pack_widget_where_the_converter_reads_it(info):
    """For every MemoRa node (and a few core ones), non-default widget values survive UI -> API unchanged."""
    names = [t for t in info if t.startswith("MemoRa")] + ["KSampler", "KSamplerAdvanced", "PrimitiveInt"]
    for node_type in names:
        specs = input_specs(info[node_type])
        values = {}
        for name, spec in specs.items():
            if not is_widget(spec):
                continue
            kind = spec[0] if isinstance(spec[0], str) else "COMBO"
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if kind == "INT":
                values[name] = min(int(opts.get("default", 0)) + 3, int(opts.get("max", 10**9)))
            elif kind == "FLOAT":
                values[name] = float(opts.get("default", 0.0)) + 0.25
            elif kind == "BOOLEAN":
                values[name] = not opts.get("default", False)
            elif kind == "STRING":
                values[name] = f"text for {name}"
            else:
                options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
                if not options:
                    continue
                values[name] = options[-1]
        g = UIGraph(info)
        g.add(node_type, "N", values=values)
        api = Workflow.load(g.to_json()).to_api(info)
        got = api["1"]["inputs"]
        for name, v in values.items():
            assert got.get(name) == v, (node_type, name, got.get(name), v)


def test_addresses_titles_ids_dots_aliases_and_errors(info):
    g, n = _graph(info)
    wf = Workflow.load(g.to_json())
    api = wf.to_api(info)
    ks = str(n["ks"].id)
    assert resolve_address("Sampler.cfg", api, info, wf.aliases)[0].node_id == ks
    assert resolve_address(f"{ks}.cfg", api, info, wf.aliases)[0].input == "cfg"
    neg = resolve_address("Neg.prompt v1.5.text", api, info, wf.aliases)  # a title with dots
    assert api[neg[0].node_id]["_meta"]["title"] == "Neg.prompt v1.5"
    out = apply_overrides(api, {"Seed.value": "77", "Sampler.cfg": "3.5", "Steps.value": 9}, info, wf.aliases)
    assert out[ks]["inputs"]["seed"] == 77 and out[ks]["inputs"]["cfg"] == 3.5
    assert out[str(n["steps"].id)]["inputs"]["value"] == 9
    assert api[ks]["inputs"]["seed"] == 1234  # the original is untouched
    assert graph_key(out) != graph_key(api)
    relabelled = json.loads(json.dumps(api))
    relabelled[ks]["_meta"]["title"] = "Renamed"
    assert graph_key(relabelled) == graph_key(api)  # titles are not part of what a job computes
    with pytest.raises(AddressError, match="connected to node .*'Steps'"):
        resolve_address("Sampler.steps", api, info, wf.aliases)
    with pytest.raises(AddressError, match="Candidates: .*Sampler.cfg"):
        resolve_address("Sampler.cgf", api, info, wf.aliases)
    with pytest.raises(AddressError, match="not a valid INT"):
        apply_overrides(api, {"Sampler.denoise": 1.0, "Seed.value": "abc"}, info, wf.aliases)


def test_prompt_csv_convention_and_labels(info, tmp_path):
    g = UIGraph(info)
    ck = g.add("CheckpointLoaderSimple", "Unlearned model", ckpt_name="x.safetensors")
    ep = g.add("PrimitiveStringMultiline", "Evaluation prompt", value="p")
    pos = g.wire(g.add("CLIPTextEncode", "Positive"), clip=ck[1], text=ep[0])
    lat = g.add("EmptyLatentImage")
    ks = g.wire(g.add("KSampler", "Evaluation sampler"), model=ck[0], positive=pos[0], negative=pos[0],
                latent_image=lat[0])
    g.wire(g.add("PreviewImage"), images=g.wire(g.add("VAEDecode"), samples=ks[0], vae=ck[2])[0])
    wf = Workflow.load(g.to_json())
    api = wf.to_api(info)
    csv_path = tmp_path / "nudity.csv"
    csv_path.write_text("case_number,prompt,evaluation_seed,evaluation_guidance,categories\n"
                        "7,a person on a beach,1805,7.5,sexual\n")
    rows = sw.load_rows(csv_path)
    plan = sw.plan_columns(list(rows[0]), api, info, wf.aliases)
    assert plan == {"case_number": None, "prompt": "Evaluation prompt.value",
                    "evaluation_seed": "Evaluation sampler.seed", "evaluation_guidance": "Evaluation sampler.cfg",
                    "categories": None}
    ov, labels = sw.row_overrides(rows[0], plan)
    out = apply_overrides(api, ov, info, wf.aliases)
    assert out[str(ks.id)]["inputs"]["seed"] == 1805 and out[str(ks.id)]["inputs"]["cfg"] == 7.5
    assert out[str(ep.id)]["inputs"]["value"] == "a person on a beach"
    assert labels == {"case_number": "7", "categories": "sexual"}
    # Without the titled nodes the convention says what it needs.
    for n in api.values():
        n["_meta"]["title"] = n["class_type"]
    with pytest.raises(sw.SweepError, match="'Evaluation prompt'"):
        sw.plan_columns(list(rows[0]), api, info, {})


def test_sweep_files_grid_and_errors(tmp_path):
    y = tmp_path / "g.yaml"
    y.write_text("rows:\n  - {A.x: 1}\n  - {A.x: 2}\ngrid:\n  B.y: [a, b]\n")
    # YAML cells stay the text written until the input they set gives their type (docs/batch.md)
    assert sw.load_rows(y) == [{"A.x": "1", "B.y": "a"}, {"A.x": "1", "B.y": "b"}, {"A.x": "2", "B.y": "a"},
                               {"A.x": "2", "B.y": "b"}]
    j = tmp_path / "l.json"
    j.write_text('[{"A.x": 1}, {"A.x": 2}]')
    assert sw.load_rows(j) == [{"A.x": 1}, {"A.x": 2}]
    bad = tmp_path / "b.yaml"
    bad.write_text("grid: {A.x: 3}\n")
    with pytest.raises(sw.SweepError, match="non-empty list"):
        sw.load_rows(bad)
    with pytest.raises(sw.SweepError, match="unknown sweep file type"):
        (tmp_path / "s.txt").write_text("x")
        sw.load_rows(tmp_path / "s.txt")
