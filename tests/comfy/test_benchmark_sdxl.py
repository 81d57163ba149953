"""benchmarks/memora_pipeline.py --arch sdxl: GPU only at full size (refused on a CPU with the reason), and its
--tiny form runs every stage of both pipelines on the tiny SDXL stand-in (detected by ComfyUI as SDXL), with the
UNet calls the batching arithmetic promises."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "memora_pipeline.py"
STEPS, START, REFINE, TRAIN = 4, 2, 1, 2


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("memora_pipeline_benchmark_sdxl", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_size_sdxl_is_refused_on_the_cpu(capsys):
    mod = _load_benchmark()
    with pytest.raises(SystemExit) as exit_info:
        mod.parse_args(["--arch", "sdxl", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--arch sdxl runs on a CUDA GPU only (device here: cpu)" in err and "--tiny" in err
    a = mod.parse_args(["--arch", "sdxl", "--tiny"])
    assert (a.device, a.size, a.steps) == ("cpu", 64, 10)
    assert mod.parse_args(["--arch", "sdxl", "--device", "cuda"]).size == 1024  # parsing only: no GPU needed


def test_tiny_sdxl_pipeline_runs_every_stage(comfy, tmp_path):
    out = tmp_path / "sdxl.json"
    _load_benchmark().main(["--arch", "sdxl", "--tiny", "--steps", str(STEPS), "--start-at-step", str(START),
                            "--refine", str(REFINE), "--train-steps", str(TRAIN), "--baseline-train-steps", "1",
                            "--work-dir", str(tmp_path), "--json", str(out), "--quiet"])
    data = json.loads(out.read_text())
    assert data["config"]["arch"] == "sdxl"
    assert data["model"]["model_config"] == "SDXL" and data["model"]["model_type"] == "EPS"
    mem = {r["stage"]: r for r in data["stages"]["memora"]}
    assert set(mem) == {"text_encode", "seeds", "seed_decode_encode", "inversion", "slerp", "regeneration",
                        "regeneration_decode", "training"}
    k = STEPS - START
    assert mem["inversion"]["unet_calls"] == k * (1 + REFINE)  # 6 latents and their CFG pair: one call per step
    assert mem["regeneration"]["unet_calls"] == k
    assert mem["training"]["unet_calls"] == TRAIN
