"""Smoke test of benchmarks/memora_pipeline.py --tiny: every stage runs through the pack's nodes in both pipelines,
the JSON says so, and the UNet calls are exactly what batching promises (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "memora_pipeline.py"

STEPS, START, REFINE, TRAIN, BASELINE_TRAIN = 4, 2, 1, 3, 2
STAGES = ["text_encode", "seeds", "seed_decode_encode", "inversion", "slerp", "regeneration", "regeneration_decode",
          "training"]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("memora_pipeline_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench(comfy, tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    out = work / "tiny.json"
    mod = _load_benchmark()
    result = mod.main(["--tiny", "--steps", str(STEPS), "--start-at-step", str(START), "--refine", str(REFINE),
                       "--train-steps", str(TRAIN), "--baseline-train-steps", str(BASELINE_TRAIN),
                       "--work-dir", str(work), "--json", str(out), "--quiet"])
    return result, json.loads(out.read_text())


def _stages(data, pipeline):
    return {r["stage"]: r for r in data["stages"][pipeline]}


def test_json_matches_the_returned_result_and_has_every_stage(bench):
    result, data = bench
    assert data["summary"] == json.loads(json.dumps(result["summary"]))
    for pipeline in ("memora", "baseline"):
        stages = _stages(data, pipeline)
        assert list(stages) == STAGES
        for name, r in stages.items():
            assert r["wall_s"] > 0, (pipeline, name)
            assert r["peak_memory_bytes"] > 0, (pipeline, name)
            assert r["samples"] > 0, (pipeline, name)
    assert data["config"]["tiny"] is True
    assert data["model"]["unet_parameters"] > 0
    assert data["summary"]["speedup"]["end_to_end"] > 0


def test_unet_calls_follow_the_batching_arithmetic(bench):
    _, data = bench
    k = STEPS - START
    mem, base = _stages(data, "memora"), _stages(data, "baseline")
    # this pack: the whole batch and its CFG pair in one call per model evaluation
    assert mem["seeds"]["unet_calls"] == STEPS
    assert mem["seeds"]["unet_batch_sizes"] == {"12": STEPS}
    assert mem["inversion"]["unet_calls"] == k * (1 + REFINE)
    assert mem["inversion"]["unet_items"] == k * (1 + REFINE) * 6 * 2
    assert mem["regeneration"]["unet_calls"] == k
    assert mem["regeneration"]["unet_batch_sizes"] == {"66": k}
    assert mem["training"]["unet_calls"] == TRAIN          # batch 4, no accumulation
    assert mem["training"]["unet_items"] == TRAIN * 4
    for name in ("text_encode", "seed_decode_encode", "slerp", "regeneration_decode"):
        assert mem[name]["unet_calls"] == 0
    # the reference's pattern: one image at a time, batch 1 x 4 micro-steps per update
    assert base["seeds"]["unet_calls"] == STEPS * 6
    assert base["inversion"]["unet_calls"] == k * (1 + REFINE) * 6
    assert base["regeneration"]["unet_calls"] == k * 33
    assert base["regeneration"]["unet_batch_sizes"] == {"2": k * 33}
    assert base["training"]["unet_calls"] == BASELINE_TRAIN * 4
    assert base["training"]["unet_items"] == BASELINE_TRAIN * 4
    expected = data["expected_unet_calls"]
    for name in ("seeds", "inversion", "regeneration", "training"):
        assert mem[name]["unet_calls"] == expected["memora"][name]
        assert base[name]["unet_calls"] == expected["baseline"][name]


def test_batched_results_equal_per_image_results(bench):
    _, data = bench
    checks = data["checks"]
    assert set(checks) == {f"{k}_max_abs_diff_batched_vs_per_image" for k in ("seeds", "inversion", "regeneration")}
    for name, diff in checks.items():
        assert diff < 1e-2, (name, diff)


def test_baseline_training_is_extrapolated_to_the_full_run(bench):
    _, data = bench
    tr = _stages(data, "baseline")["training"]
    assert tr["updates"] == BASELINE_TRAIN and tr["extrapolated_to_updates"] == TRAIN
    assert tr["wall_s_extrapolated"] > tr["wall_s"]
    assert tr["gradient_checkpointing"] is True and tr["vae_and_text_encoder_per_micro_step"] is True
    groups = data["summary"]["baseline"]["groups"]
    assert groups["training"]["wall_s"] == pytest.approx(tr["wall_s_extrapolated"])
    assert all(isinstance(v, float) and v > 0 for v in data["losses"].values())
