"""Peak activation memory of the SD1.5-architecture UNet in ComfyUI, measured device-independently on the CPU.

Where no GPU is at hand, this measures what a GPU would have to hold beyond the weights: every tensor ATen
allocates while the operation runs (activations, temporaries, tensors autograd saves for the backward pass, weight
copies made by weight wrappers) is tracked by storage until PyTorch frees it; the peak of the live total is
reported. Weights that exist before the probe starts are not counted (add them: ``weights_gib``).

    python benchmarks/memory_probe.py --size 128 --json probe.json

It runs on ComfyUI's PyTorch (SDPA) attention, which is what ComfyUI uses on NVIDIA GPUs and whose memory is
linear in the number of tokens (the flash / memory-efficient kernels keep no attention matrix); every activation of
the UNet is then proportional to batch x latent area, so figures at 128 px scale by 16 to 512 px, and by 0.5 from
fp32 (the CPU) to fp16/bf16. The probe prints those projections; they are estimates, marked as such.

Probes: inference (one guided UNet call of a batch, as MemoRa DDIM Inversion / Regenerate make it) and one LoRA
training update through MemoRa LoRA Train's host (``train_on_model``: attention LoRA on a clone, identity weight
wrappers elsewhere), with and without gradient checkpointing."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
GIB = 2 ** 30


class LiveTensorBytes:
    """A TorchDispatchMode that tracks the bytes of every storage created while it is active until it is freed.

    A result that shares the storage of one of the op's inputs (views, in-place ops, e.g. a weight's ``detach()``)
    allocated nothing and is not counted."""

    def __init__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self._weak = StorageWeakRef
        self.live: dict[int, tuple] = {}
        self.current = 0
        self.peak = 0
        self.peak_by_op: dict[str, int] = {}
        self._ops = 0
        self._last_snapshot = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out, func, (args, kwargs))
                return out

        self.mode = _Mode()

    def _sweep(self):
        dead = [k for k, entry in self.live.items() if entry[0].expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    @staticmethod
    def _storage_key(t):
        try:
            return t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):
            return None

    def _record(self, out, func=None, inputs=None):
        import torch
        from torch.utils._pytree import tree_flatten

        schema = getattr(func, "_schema", None)
        aliased = set()
        if schema is not None and any(r.alias_info is not None for r in schema.returns) and inputs is not None:
            # a view or in-place result shares an input's storage (e.g. a weight's detach()): nothing allocated;
            # ops that MAY alias (to(copy=True)) count when their result has a storage of its own
            aliased = {self._storage_key(t) for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key = st._cdata
            if key in self.live or key in aliased or st.nbytes() == 0:
                continue
            self.live[key] = (self._weak(st), st.nbytes(), str(func))
            self.current += st.nbytes()
        self._ops += 1
        if self._ops % 64 == 0:
            self._sweep()
        if self.current > self.peak:
            self._sweep()  # only storages still alive count towards a new peak
        if self.current > self.peak:
            self.peak = self.current
            if self.peak > self._last_snapshot * 1.02:  # what is alive at the peak, by the op that made it
                self._last_snapshot = self.peak
                by: dict[str, int] = {}
                for _ref, n, op in self.live.values():
                    by[op] = by.get(op, 0) + n
                self.peak_by_op = dict(sorted(by.items(), key=lambda kv: -kv[1])[:8])

    def __enter__(self):
        self.live.clear()
        self.current = self.peak = self._last_snapshot = 0
        self.peak_by_op = {}
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self._sweep()
        return False


def _fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """(fixed, per item) from (items, bytes) points: a line through the smallest and largest batch."""
    points = sorted(points)
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    (b1, p1), (b2, p2) = points[0], points[-1]
    per = (p2 - p1) / (b2 - b1)
    return p1 - per * b1, per


def project(results: dict, size: int) -> dict:
    """Estimates at 512 px in fp16/bf16: the per-item part scales with the latent area and halves with the dtype;
    the fixed part (e.g. weight copies) only halves."""
    scale = (512 / size) ** 2
    out = {}
    fixed, per = _fit([(r["batch_items"], r["peak_activation_bytes"]) for r in results["inference"]])
    out["inference"] = {"fixed_gib": fixed * 0.5 / GIB, "per_item_gib": per * scale * 0.5 / GIB}
    for ck in (False, True):
        pts = [(r["batch"], r["peak_activation_bytes"]) for r in results["training"]
               if r["gradient_checkpointing"] is ck]
        if pts:
            fixed, per = _fit(pts)
            out[f"training_checkpointing_{ck}"] = {"fixed_gib": fixed * 0.5 / GIB,
                                                   "per_sample_gib": per * scale * 0.5 / GIB}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128, help="image size in pixels (default 128)")
    p.add_argument("--batches", default="1,2", help="inference batch items per call to probe (default 1,2)")
    p.add_argument("--train-batches", default="1,2",
                   help="training micro-batches to probe (default 1,2: two sizes separate the per-sample part from "
                        "the fixed part, e.g. weight copies)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/memora_bench_work"),
                   help="where the random SD1.5 checkpoint is (made if missing; default /tmp/memora_bench_work)")
    p.add_argument("--comfyui", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import memora_pipeline as mp
    from memora_batch.embedded import find_comfyui

    comfy_path = find_comfyui(str(a.comfyui) if a.comfyui else None)
    args = argparse.Namespace(device="cpu", attention="pytorch", quiet=True, tiny=False, model_seed=0)
    mp.configure_comfy_args(args, comfy_path)
    base = a.work_dir.resolve()
    comfy = mp.boot_comfy(args, comfy_path, base)
    ckpt, info = mp.build_checkpoint(args, base)
    model, clip, vae = mp.call_node("CheckpointLoaderSimple", ckpt_name=ckpt)[:3]
    import comfy.ldm.modules.attention as attn
    import comfy.model_management as mm

    th = mp.pack_module("nodes._train_host")
    recipe_mod = mp.pack_module("memora.lora.recipe")
    pos = mp.call_node("CLIPTextEncode", clip=clip, text=mp.CONCEPT)[0]
    mp.call_node("CLIPTextEncode", clip=clip, text="")[0]
    h = a.size // 8
    results = {"size": a.size, "attention": attn.optimized_attention.__name__, "comfyui": comfy.version,
               "unet_weight_bytes": int(sum(t.numel() * t.element_size()
                                            for t in model.model.diffusion_model.state_dict().values())),
               "inference": [], "training": []}
    mm.load_models_gpu([model])
    for b in [int(x) for x in a.batches.split(",") if x.strip()]:
        x = torch.randn(b, 4, h, h)
        sigma = torch.full((b,), 5.0)
        cond = torch.cat([pos[0][0]] * b)
        with torch.inference_mode():
            t0 = time.perf_counter()
            with LiveTensorBytes() as tr:
                model.model.apply_model(x, sigma, c_crossattn=cond)
            dt = time.perf_counter() - t0
        results["inference"].append({"batch_items": b, "peak_activation_bytes": tr.peak, "seconds": dt,
                                     "alive_at_peak_by_op": tr.peak_by_op})
        print(f"inference: batch {b} at {a.size} px: peak activations {tr.peak / GIB:.3f} GiB fp32 "
              f"({dt:.1f} s)", flush=True)
    if not a.skip_training:
        samples = torch.randn(4, 4, h, h) / 0.18215 * 0.5
        for ckpt_on in (False, True):
            for tb in [int(x) for x in a.train_batches.split(",") if x.strip()]:
                recipe = recipe_mod.LoRARecipe(steps=1, batch_size=tb, gradient_accumulation=1).validate()
                t0 = time.perf_counter()
                with torch.inference_mode():
                    with LiveTensorBytes() as tr:
                        th.train_on_model(model, pos, samples, recipe, "fp32", ckpt_on)
                dt = time.perf_counter() - t0
                results["training"].append({"batch": tb, "gradient_checkpointing": ckpt_on,
                                            "peak_activation_bytes": tr.peak, "seconds": dt,
                                            "alive_at_peak_by_op": tr.peak_by_op})
                print(f"training: batch {tb} at {a.size} px, checkpointing {ckpt_on}: peak "
                      f"{tr.peak / GIB:.3f} GiB fp32 ({dt:.1f} s)", flush=True)
    results["projection_estimate_512px_half_precision"] = project(results, a.size)
    results["weights_gib_fp16"] = results["unet_weight_bytes"] / 2 / GIB if model.model.get_dtype() == torch.float32 \
        else results["unet_weight_bytes"] / GIB
    print(json.dumps(results, indent=1))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
