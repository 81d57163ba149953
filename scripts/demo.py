#!/usr/bin/env python3
"""The README's main job on a small built-in model: MemoRa end to end (example_workflows/memora_recovery.json)
through ComfyUI's own executor, on a tiny SD1.x-architecture model with RANDOM weights built here (nothing is
downloaded). Random weights mean the images are noise and the scores meaningless: this shows the pipeline running
and where everything goes, not a recovery. For a real recovery use your own checkpoints:

    memora-batch demo --original sd-v1-4.ckpt --unlearned esd-nudity.safetensors --concept "a photo of the nude person"

Usage: python scripts/demo.py [--out DIR] [extra memora-batch demo flags]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "tests" / "support"
CKPT = "memora_tiny_random.safetensors"


def build_checkpoint(base: Path, comfy: Path) -> None:
    """Write the tiny random checkpoint with ComfyUI importable (a child process: ComfyUI's modules are global)."""
    target = base / "models" / "checkpoints" / CKPT
    if target.exists():
        return
    code = (
        "import sys; from pathlib import Path; "
        f"sys.path[:0] = [{str(comfy)!r}, {str(SUPPORT)!r}]; "
        "import torch; from comfy.cli_args import args; args.cpu = not torch.cuda.is_available(); "
        "import memora_testkit, tiny_models; "
        f"tiny_models.build_tiny_checkpoint(Path({str(target)!r}), seed=0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "comfyui-memora" / "demo"),
                    help="working folder: ComfyUI base directory (models/, output/) and results")
    args, rest = ap.parse_known_args(argv)
    from memora_batch.embedded import find_comfyui

    comfy = find_comfyui()
    if comfy is None:
        print("no ComfyUI checkout: run scripts/setup.sh first (or set COMFYUI_PATH)", file=sys.stderr)
        return 2
    base = Path(args.out).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    print(f"demo: building a tiny SD1.x-architecture model with RANDOM weights in {base / 'models' / 'checkpoints'}")
    build_checkpoint(base, comfy)
    cmd = [sys.executable, "-m", "memora_batch.cli", "demo", "--comfyui", str(comfy), "--base-directory", str(base),
           "--custom-nodes", str(SUPPORT / "memora_testkit"), "--original", CKPT, "--unlearned", CKPT,
           "--concept", "a photo of the parachute", "--quick", "--cpu", "--out", str(base / "results"), *rest]
    print("demo: " + " ".join(cmd[2:]), flush=True)
    rc = subprocess.call(cmd, cwd=str(ROOT))
    print(f"demo: ComfyUI outputs (images, LoRA, score reports) are under {base / 'output'} and "
          f"{base / 'models' / 'loras'}; the results table is in {base / 'results'}. The model is random: "
          f"the numbers show the plumbing, not a recovery.")
    return rc


if __name__ == "__main__":
    sys.exit(main())
