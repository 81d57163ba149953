#!/usr/bin/env python3
"""The README's main job: MemoRa end to end on the micro world shipped with the pack.

Runs example_workflows/memora_recovery.json through ComfyUI's own executor (in this process, CPU unless a GPU is
there) with its model loaders swapped for the micro world (MemoRa Load Micro World: the original and the ESD-x model
(variant esd_x) of a tiny SD1.x-family text-to-image model trained on five procedural shapes) and its concept
scores for the micro world's detector. The original model draws seed images of the erased concept; the unlearned
model inverts, slerps and regenerates them; MemoRa LoRA Train trains a LoRA on the result; the recovered model
draws again. Printed: the detector rate of the erased concept under the original, unlearned and recovered models,
the similarity to the original's images, and where the LoRA, the images and the report went.

Usage: python scripts/demo.py [--out DIR] [--quick] [other memora-batch demo flags]
Your own models instead: memora-batch demo --original sd-v1-4.ckpt --unlearned esd.safetensors --concept "..."
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "comfyui-memora" / "demo"),
                    help="working folder: ComfyUI base directory (models/, output/) and results")
    args, rest = ap.parse_known_args(argv)
    sys.path.insert(0, str(ROOT))
    from memora.micro import world
    from memora_batch.embedded import find_comfyui

    comfy = find_comfyui()
    if comfy is None:
        print("no ComfyUI checkout: run scripts/setup.sh first (or set COMFYUI_PATH)", file=sys.stderr)
        return 2
    try:
        world.load_manifest()
    except (FileNotFoundError, ValueError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    base = Path(args.out).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "memora_batch.cli", "demo", "--comfyui", str(comfy), "--base-directory", str(base),
           "--out", str(base / "results"), *rest]
    print("demo: " + " ".join(cmd[2:]), flush=True)
    rc = subprocess.call(cmd, cwd=str(ROOT))
    print(f"demo: ComfyUI's folders for this run are under {base} (models/loras, output); the results table is in "
          f"{base / 'results'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
