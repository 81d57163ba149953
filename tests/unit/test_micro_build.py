"""The micro world's shipped files and the build's reproducibility claims (no ComfyUI executor): every file matches
its manifest's sha256, the weights fit the size budget, a variant is the original plus its partial file, the
closed-form UCE variant is rebuilt from the shipped original within the documented tolerance, and the build's
class-balanced batches and UCE solve do what they say."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from memora.micro import data, text, world
from memora_build import micro_diffusion, micro_erasure

#: docs/micro-world.md: the UCE file is rebuilt from the shipped original and text encoder within this (absolute,
#: per weight): the solve is float64, the only float32 step is the text encoder's forward pass
UCE_REBUILD_ATOL = 1e-5
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifest():
    return world.load_manifest()


def test_every_shipped_file_matches_its_manifest_and_the_budget(manifest):
    total = 0
    for name, rec in manifest["files"].items():
        path = world.weights_dir() / rec["file"]
        assert world.sha256_file(path) == rec["sha256"], name
        assert path.stat().st_size == rec["bytes"], name
        assert rec["built_by"]["script"] == "scripts/build_micro_world.py" and rec["seeds"], name
        total += rec["bytes"]
    assert set(world.VARIANTS) <= set(manifest["files"]) and {"clip", "vae", "detector"} <= set(manifest["files"])
    assert total <= 60 * 2 ** 20, f"shipped weights {total / 2 ** 20:.1f} MiB > 60 MiB"


def test_variant_is_the_original_plus_its_partial_file(manifest):
    full = world.unet_state_dict("esd_x", load_file)
    orig = load_file(str(world.weight_path("original")))
    own = load_file(str(world.weight_path("esd_x")))
    assert full.keys() == orig.keys() and 0 < len(own) < len(orig)
    assert all(torch.equal(full[k], own[k]) for k in own)
    assert all(torch.equal(full[k], orig[k]) for k in orig if k not in own)


def test_partial_file_that_does_not_fit_the_original_is_refused(manifest, tmp_path):
    d = tmp_path / "w"
    shutil.copytree(world.weights_dir(), d)
    own = load_file(str(d / manifest["files"]["uce"]["file"]))
    key = next(iter(own))
    cases = {"lacks": {**own, "not.a.unet.tensor": torch.zeros(1)},
             "shape": {**own, key: torch.zeros(3, 3)}}
    for match, tensors in cases.items():
        save_file(tensors, str(d / manifest["files"]["uce"]["file"]))
        m = json.loads((d / world.MANIFEST).read_text())
        m["files"]["uce"]["sha256"] = world.sha256_file(d / m["files"]["uce"]["file"])
        (d / world.MANIFEST).write_text(json.dumps(m))
        with pytest.raises(ValueError, match=match):
            world.unet_state_dict("uce", load_file, d)


def test_tampered_file_is_refused_naming_it(manifest, tmp_path):
    d = tmp_path / "w"
    shutil.copytree(world.weights_dir(), d)
    path = d / manifest["files"]["vae"]["file"]
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x80
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="does not match its manifest") as e:
        world.weight_path("vae", d)
    assert str(path) in str(e.value)
    with pytest.raises(ValueError, match="unknown micro-world variant 'unlearned'.*esd_x"):
        world.check_variant("unlearned")


def test_uce_variant_is_rebuilt_from_the_shipped_original(manifest, comfy_path):
    """UCE is closed-form: the shipped file is what uce_edit computes from the shipped original and text encoder."""
    prefix = "cond_stage_model.transformer."
    clip = text.load_text_model({k[len(prefix):]: v for k, v in load_file(str(world.weight_path("clip"))).items()})
    tok = text.tokenizer(Path(comfy_path) / "comfy" / "sd1_tokenizer")
    ctx = text.encode(clip, tok, [data.caption(c) for c in data.CONCEPTS] + [""])
    rec = manifest["recipe"]["variants"]["uce"]["recipe"]
    idx = [data.CONCEPTS.index(c) for c in rec["erase"]]
    tokens = micro_erasure.uce_token_sets(ctx[:-1], ctx[-1], idx, rec["guide"])
    orig = load_file(str(world.weight_path("original")))
    edited, log = micro_erasure.uce_edit(orig, tokens["erase"], tokens["guide"], tokens["preserve"], lam=rec["lam"],
                                         preserve_weight=rec["preserve_weight"])
    shipped = load_file(str(world.weight_path("uce")))
    assert edited.keys() == shipped.keys()
    worst = max(float((edited[k] - shipped[k]).abs().max()) for k in shipped)
    print(f"UCE rebuilt: largest difference {worst:.2e} (tolerance {UCE_REBUILD_ATOL:g})")
    assert worst <= UCE_REBUILD_ATOL


def test_uce_edit_maps_erased_tokens_and_keeps_preserved_ones():
    g = torch.Generator().manual_seed(0)
    sd = {"b.attn2.to_k.weight": torch.randn(8, 6, generator=g), "b.attn2.to_v.weight": torch.randn(8, 6, generator=g),
          "b.attn1.to_k.weight": torch.randn(8, 8, generator=g)}
    erase, guide = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    keep = torch.randn(3, 6, generator=g)
    edited, log = micro_erasure.uce_edit(sd, erase, guide, keep, lam=1e-6, preserve_weight=1.0)
    assert sorted(edited) == ["b.attn2.to_k.weight", "b.attn2.to_v.weight"]  # self-attention untouched
    for k, w in edited.items():
        # 5 constraints in 6 dimensions: both sets are met (almost) exactly
        torch.testing.assert_close(erase @ w.T, guide @ sd[k].T, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(keep @ w.T, keep @ sd[k].T, atol=1e-3, rtol=1e-3)
    assert log["erased_tokens_relative_residual"] < 1e-3
    with pytest.raises(ValueError, match="pair up"):
        micro_erasure.uce_edit(sd, erase, guide[:1], keep)


def test_class_balanced_batches():
    labels = torch.tensor([0] * 50 + [1] * 5 + [3] * 200)
    draw = micro_diffusion._balanced_sampler(labels, 64, torch.Generator().manual_seed(1))
    counts = torch.zeros(4)
    for step in range(3):
        batch = labels[draw(step)]
        per = torch.bincount(batch, minlength=4)
        assert per[2] == 0 and per.max() - per[per > 0].min() <= 1, per
        counts += per
    assert counts[0] == counts[1] == counts[3] == 64


def test_recipe_overrides_are_checked():
    r = micro_erasure.override(micro_erasure.VARIANT_RECIPES, ["esd_u.steps=7", "uce.erase=star,cross"])
    assert r["esd_u"]["steps"] == 7 and r["uce"]["erase"] == ("star", "cross")
    assert micro_erasure.VARIANT_RECIPES["esd_u"]["steps"] != 7  # the defaults are not changed
    with pytest.raises(ValueError, match="NAME.KEY=VALUE"):
        micro_erasure.override(micro_erasure.VARIANT_RECIPES, ["esd_u.nope=1"])


def test_safetensors_files_are_written_canonically_and_an_unchanged_network_keeps_its_file(tmp_path):
    """safetensors writes metadata in a hash map's order (it changed between builds, and with it every sha256): the
    build sorts it, and a --reuse build keeps an unchanged network's earlier file byte for byte."""
    from safetensors import safe_open
    from safetensors.torch import save

    from memora_build.micro_files import canonical_safetensors, save_safetensors

    tensors = {"b.weight": torch.randn(3, 2), "a.bias": torch.randn(4)}
    meta = {"format": "memora micro world", "build": "scripts/build_micro_world.py", "base": "original"}
    blobs = {canonical_safetensors(save(tensors, metadata=dict(order))) for order in
             (sorted(meta.items()), sorted(meta.items(), reverse=True), list(meta.items()))}
    assert len(blobs) == 1
    (blob,) = blobs
    header = blob[8:8 + int.from_bytes(blob[:8], "little")].decode()
    md = json.loads(header)["__metadata__"]
    assert list(md) == sorted(meta) and md == meta
    # an older build's file with the same tensors and metadata in another order is kept as it was
    older = tmp_path / "older.safetensors"
    save_file(tensors, str(older), metadata=dict(reversed(list(meta.items()))))
    rec = save_safetensors(tensors, tmp_path / "new.safetensors", meta, previous=older)
    assert (tmp_path / "new.safetensors").read_bytes() == older.read_bytes()
    assert rec["sha256"] == world.sha256_file(older) and rec["tensors"] == 2
    # a changed tensor (or changed metadata) writes the new, canonical file
    changed = {**tensors, "a.bias": tensors["a.bias"] + 1e-6}
    save_safetensors(changed, tmp_path / "new.safetensors", meta, previous=older)
    got = (tmp_path / "new.safetensors").read_bytes()
    assert got != older.read_bytes() and got == canonical_safetensors(got)
    assert torch.equal(load_file(str(tmp_path / "new.safetensors"))["a.bias"], changed["a.bias"])
    with safe_open(str(tmp_path / "new.safetensors"), "pt") as f:
        assert f.metadata() == meta


def _build_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_micro_world", ROOT / "scripts" / "build_micro_world.py")
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build  # its dataclasses look their module up
    try:
        spec.loader.exec_module(build)
    finally:
        del sys.modules[spec.name]
    return build


def test_the_variants_a_rebuild_may_name_are_checked():
    build = _build_script()
    assert build.check_variant_names("esd_x, esd_x_long") == ("esd_x", "esd_x_long")
    assert build.check_variant_names(None) == ()
    with pytest.raises(SystemExit, match="'esd_y' is not|esd_y is not a variant of the original"):
        build.check_variant_names("esd_x,esd_y")
    with pytest.raises(SystemExit, match="never_learned is not a variant of the original"):
        build.check_variant_names("never_learned")


def test_size_scale_and_unconditional_extras_options(manifest, tmp_path, capsys):
    """The options that build the v3 candidate (docs/micro-world.md) are off by default, spelled one way (what
    --reuse compares), checked with a message naming the mistake, and a --reuse of a build made without them (its
    manifest predates them: they count as off) is refused when they differ."""
    build = _build_script()
    plain = build.parse_args([])
    assert plain.size_scale == "" and plain.unconditional_extras == 0
    v3 = build.parse_args(["--size-scale", " triangle=1.250, circle=0.85", "--unconditional-extras", "1000"])
    assert v3.size_scale == "circle=0.85,triangle=1.25" and v3.unconditional_extras == 1000
    for bad, why in [("hexagon=1.2", "unknown micro-world concept 'hexagon'"), ("triangle", "expected concept=factor"),
                     ("circle=big", "is not a number"), ("circle=2", r"must be in \(0, 1.3\]"),
                     ("circle=0.9,circle=0.8", "given twice")]:
        with pytest.raises(SystemExit):
            build.parse_args(["--size-scale", bad])
        assert "--size-scale" in (err := capsys.readouterr().err) and re.search(why, err), (bad, err)
    with pytest.raises(SystemExit):
        build.parse_args(["--unconditional-extras", "-1"])
    assert "expected 0 or more images" in capsys.readouterr().err
    assert build.parse_args(["--size-scale", "circle=1,triangle=1.25"]).size_scale == "triangle=1.25"
    # a manifest that predates the options (as the shipped one may): both count as off, so a plain --reuse matches
    older = json.loads(json.dumps(manifest))
    for key in ("size_scale", "unconditional_extras"):
        older["args"].pop(key, None)
    older.pop("size_scale", None)
    assert build._earlier_arg(older, "size_scale") == "" and build._earlier_arg(older, "unconditional_extras") == 0
    # a build of the micro-v3 branch records the near-shapes but not the scale it hard-coded
    branch = json.loads(json.dumps(older))
    branch["args"]["unconditional_extras"] = 1000
    assert world.size_scale(branch) == {"circle": 0.85, "triangle": 1.25} and world.size_scale(older) == {}
    assert build._earlier_arg(branch, "size_scale") == "circle=0.85,triangle=1.25"
    prev = tmp_path / "earlier"
    prev.mkdir()
    (prev / world.MANIFEST).write_text(json.dumps(older))
    for argv, name in [(["--size-scale", "triangle=1.25"], "size_scale"), (["--unconditional-extras", "10"],
                                                                          "unconditional_extras")]:
        args = build.parse_args(["--reuse", str(prev), *argv])
        with pytest.raises(SystemExit, match=f"built with {name}=(''|0), this run has"):
            build.reuse_build(args, None, None)
    (prev / world.MANIFEST).write_text(json.dumps(branch))
    with pytest.raises(SystemExit, match="built with size_scale='circle=0.85,triangle=1.25', this run has ''"):
        build.reuse_build(build.parse_args(["--reuse", str(prev), "--unconditional-extras", "1000"]), None, None)


def test_size_scale_scales_only_the_named_concepts():
    """data.set_size_scale: the same random draws, the named concepts' radius scaled (area by the factor squared, up
    to a corner clipped at the image border), every other concept's images identical; the default (empty) scale
    draws the shipped world's images."""
    def masks(concept):
        return np.stack([data._render_mask(*data.shape_outline(concept, np.random.default_rng([21, i])),
                                           data.IMAGE_SIZE) for i in range(60)])

    assert data.SIZE_SCALE == {}
    plain = {c: masks(c) for c in data.CONCEPTS}
    try:
        data.set_size_scale({"triangle": 1.25, "circle": 0.85})
        scaled = {c: masks(c) for c in data.CONCEPTS}
        with pytest.raises(ValueError, match="unknown micro-world concept 'oval'"):
            data.set_size_scale({"triangle": 1.1, "oval": 1.1})
        with pytest.raises(ValueError, match=r"must be in \(0, 1.3\]"):
            data.set_size_scale({"circle": 2})
        assert data.SIZE_SCALE == {"triangle": 1.25, "circle": 0.85}  # a refused setting changes nothing
    finally:
        data.set_size_scale({})
    assert np.array_equal(masks("triangle"), plain["triangle"])
    for concept in data.CONCEPTS:
        factor = {"triangle": 1.25, "circle": 0.85}.get(concept)
        if factor is None:
            assert np.array_equal(scaled[concept], plain[concept]), concept
        else:
            assert scaled[concept].sum() / plain[concept].sum() == pytest.approx(factor ** 2, rel=0.06), concept


class _ScaleByPrompt(torch.nn.Module):
    """A noise predictor with one free number per prompt: eps(x, t, c) = s[c] * x (the prompt read from the
    context's first value: 0 the empty prompt, k + 1 the k-th concept). Its best s per prompt is known in closed
    form up to sampling noise, which makes what train_eps fits visible."""

    def __init__(self, k: int):
        super().__init__()
        self.s = torch.nn.Parameter(torch.zeros(k + 1))

    def forward(self, x, t, ctx):
        return self.s[ctx[:, 0, 0].round().long()].view(-1, 1, 1, 1) * x


def _fit_scales(fold=None, seed=3, p_uncond=0.5, steps=600):
    g = torch.Generator().manual_seed(11)
    # two classes whose latents differ in size: the best s differs per class, the empty prompt's lies between
    latents = torch.cat([torch.randn(200, 4, 2, 2, generator=g) * 8.0, torch.randn(200, 4, 2, 2, generator=g) * 0.5])
    labels = torch.tensor([0] * 200 + [1] * 200)
    contexts = torch.stack([torch.full((77, 4), 1.0), torch.full((77, 4), 2.0)])
    model = _ScaleByPrompt(2)
    micro_diffusion.train_eps(model, latents, labels, contexts, torch.zeros(77, 4), steps=steps, batch=128, lr=0.02,
                              seed=seed, p_uncond=p_uncond, warmup=10, ema_decay=0.9, balanced=True,
                              guidance_fold=fold)
    return model.s.detach()


def test_guidance_fold_fits_the_guided_prediction():
    """Phase 3's guidance folding (micro_diffusion.train_eps guidance_fold): for a folded class the guided prediction
    eps('') + w (eps(c) - eps('')) is what fits the data, so the conditional-unconditional difference comes out
    1/w of the plain one, the empty prompt's prediction is learned as before, an unfolded class is unchanged; and a
    fold of all ones is the plain training exactly."""
    plain = _fit_scales()
    assert torch.equal(_fit_scales(torch.ones(2)), plain)
    w = 3.0
    folded = _fit_scales(torch.tensor([w, 1.0]))
    u_plain, u_fold = float(plain[0]), float(folded[0])
    assert abs(u_fold - u_plain) < 0.02, (u_plain, u_fold)
    diff_plain, diff_fold = float(plain[1] - plain[0]), float(folded[1] - folded[0])
    assert abs(diff_plain) > 0.05, diff_plain  # the class really differs from the empty prompt
    assert diff_fold / diff_plain == pytest.approx(1 / w, rel=0.15), (diff_plain, diff_fold)
    assert float(folded[2]) == pytest.approx(float(plain[2]), abs=0.02)  # the unfolded class
    # the unconditional prediction inside the fold is a constant: with every caption kept, the empty prompt's
    # number never moves (a fold that let the gradient through it would move it at the first step)
    assert float(_fit_scales(torch.tensor([w, w]), p_uncond=0.0, steps=5)[0]) == 0.0


def test_calibration_options(tmp_path, capsys):
    """--world picks a world's settings (the calibrated world by default, v2.1 without phase 3, v3) and an option
    given overrides its preset; phase 3's options are spelled one way, checked with a message naming the mistake;
    phase 3 draws at --size-scale's scale unless told otherwise; a --reuse of a build made before them counts them as off
    (and names --reuse-phase2 when only phase 3 differs); --reuse-phase2 takes a build without phase 3 only,
    --reuse-phase1 one without phases 2 and 3, and --reuse-shared refuses a detector that learned other sizes."""
    build = _build_script()
    shipped = build.parse_args([])
    assert shipped.world == "calibrated" and (shipped.calibrate_steps, shipped.calibrate_guidance) == (
        1000, "circle=3.0,triangle=3.0")
    assert (shipped.size_scale, shipped.unconditional_extras) == ("", 0)
    assert build.world_size_scale(shipped) == "circle=0.85,triangle=1.25"
    plain = build.parse_args(["--world", "v2.1"])
    assert (plain.calibrate_steps, plain.calibrate_guidance, plain.calibrate_size_scale) == (0, "", "")
    assert build.world_size_scale(plain) == ""
    assert vars(build.parse_args(["--calibrate-steps", "0"])) == {**vars(plain), "world": "calibrated"}
    v3 = build.parse_args(["--world", "v3"])
    assert (v3.size_scale, v3.unconditional_extras, v3.calibrate_steps) == ("circle=0.85,triangle=1.25", 1000, 0)
    cal = build.parse_args(["--world", "v2.1", "--calibrate-steps", "1000", "--calibrate-guidance",
                            " triangle=3, circle=3.0,square=1", "--calibrate-size-scale", "triangle=1.25,circle=0.85"])
    assert cal.calibrate_guidance == "circle=3.0,triangle=3.0"
    assert build.world_size_scale(cal) == "circle=0.85,triangle=1.25"
    assert {k: v for k, v in vars(cal).items() if k != "world"} == {k: v for k, v in vars(shipped).items()
                                                                     if k != "world"}
    inherit = build.parse_args(["--size-scale", "triangle=1.25", "--calibrate-steps", "10"])
    assert build.world_size_scale(inherit) == "triangle=1.25"  # phase 3 draws what phases 1-2 drew
    unscaled = build.parse_args(["--size-scale", "triangle=1.25", "--calibrate-steps", "10",
                                 "--calibrate-size-scale", "none"])
    assert build.world_size_scale(unscaled) == ""
    for argv, why in [(["--calibrate-steps", "5", "--calibrate-guidance", "oval=3"], "unknown micro-world concept 'oval'"),
                      (["--calibrate-steps", "5", "--calibrate-guidance", "circle=0.5"], "finite number >= 1"),
                      (["--calibrate-steps", "5", "--calibrate-guidance", "circle=x"], "the weight 'x' is not a number"),
                      (["--calibrate-steps", "5", "--calibrate-guidance", "circle"], r"expected concept=weight \(e.g."),
                      (["--calibrate-steps", "5", "--calibrate-guidance", "circle=2,circle=3"], "given twice"),
                      (["--world", "v2.1", "--calibrate-guidance", "circle=3"], "give --calibrate-steps N too"),
                      (["--calibrate-steps", "0", "--calibrate-size-scale", "circle=0.9"], "give --calibrate-steps N"),
                      (["--world", "v4"], "invalid choice: 'v4'"),
                      (["--calibrate-steps", "-1"], "expected 0 or more updates"),
                      (["--calibrate-steps", "5", "--calibrate-lr", "0"], "expected a positive learning rate"),
                      (["--calibrate-steps", "5", "--calibrate-size-scale", "circle=9"], r"must be in \(0, 1.3\]"),
                      (["--world", "v2.1", "--reuse-phase2", "b"], "--reuse-phase2 starts phase 3 .* give"),
                      (["--reuse", "a", "--reuse-phase2", "b", "--calibrate-steps", "5"], "exclude each other")]:
        with pytest.raises(SystemExit):
            build.parse_args(argv)
        assert re.search(why, err := capsys.readouterr().err), (argv, err)
    # an earlier build's manifest made before the options existed, with this script's default arguments
    older = json.loads(json.dumps(world.load_manifest()))
    older["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(plain).items()
                     if k not in build.CALIBRATE_ARGS}
    older["size_scale"] = {}
    assert [build._earlier_arg(older, k) for k in build.CALIBRATE_ARGS] == [0, 3e-4, "", ""]
    prev = tmp_path / "earlier"
    prev.mkdir()
    (prev / world.MANIFEST).write_text(json.dumps(older))
    with pytest.raises(SystemExit, match="built with calibrate_steps=0, this run has 1000; --reuse-phase2 to run"):
        build.reuse_build(build.parse_args(["--reuse", str(prev)]), None, None)
    with pytest.raises(SystemExit, match="its detector learned shapes drawn at size scale '', this world's are drawn"
                                         " at 'circle=0.85'"):
        build.phase1_from(build.parse_args(["--reuse-shared", str(prev), "--calibrate-steps", "10",
                                            "--calibrate-size-scale", "circle=0.85"]), None, None)
    calibrated = json.loads(json.dumps(older))
    calibrated["args"]["calibrate_steps"] = 1000
    (prev / world.MANIFEST).write_text(json.dumps(calibrated))
    with pytest.raises(SystemExit, match="its UNets already had phase 3"):
        build.phase1_from(build.parse_args(["--reuse-phase2", str(prev), "--calibrate-steps", "1000"]), None, None)
    calibrated["args"]["finetune_steps"] = 0
    (prev / world.MANIFEST).write_text(json.dumps(calibrated))
    with pytest.raises(SystemExit, match="its UNets already had phase 2 or 3"):
        build.phase1_from(build.parse_args(["--reuse-phase1", str(prev), "--finetune-steps", "0"]), None, None)
