"""MemoRa end to end through this pack's nodes, timed stage by stage, against the reference implementation's
pattern in the same run.

    python benchmarks/memora_pipeline.py --json bench.json              # SD1.5 architecture, random weights
    python benchmarks/memora_pipeline.py --tiny --json tiny.json        # tiny model, CPU, seconds (CI smoke test)
    python benchmarks/memora_pipeline.py --arch sdxl --json sdxl.json   # SDXL-base architecture at 1024 px, GPU only
    python benchmarks/memora_pipeline.py --arch sdxl --tiny             # the tiny SDXL stand-in, CPU (smoke test)

What runs (the reference configuration, docs/method.md): 6 seed images at 512 px (DDIM 50 steps, cfg 7.5, the
reference seed pairs), VAE decode + encode, DDIM inversion over 50 steps from start_at_step 15 with cfg 7.5, slerp of
the 3 pairs to 33 latents, regeneration of the 33, VAE decode of the 33, LoRA training for 500 updates at effective
batch 4. One random model plays both the original and the unlearned model.

Two pipelines over the same model:
- ``memora``: this pack's way. Seeds in one batch (per-seed noise, so the images are the reference seeds' images),
  MemoRa DDIM Inversion / Regenerate on the whole batch (ComfyUI puts the batch and its CFG pair through the model
  in one call per step when its memory estimate allows), MemoRa LoRA Train on the regenerated latents (cached
  latents, batch 4, no VAE or text encoder in the loop).
- ``baseline``: the reference's pattern through the same nodes: one KSampler per seed image, inversion and
  regeneration one image at a time, per-image VAE calls, and training at batch 1 x 4 accumulation with gradient
  checkpointing, fp16 on a GPU, and a VAE encode of the image plus a text-encoder pass at every micro-step (the
  reference re-encodes every image at every micro-step). The baseline's training runs ``--baseline-train-steps``
  updates and is extrapolated to ``--train-steps`` from its steady per-update time (say 0 to run it all).

Per stage: wall time (and the process's CPU time, which other processes on a shared CPU disturb less), UNet calls
and the batch items they carried (counted by a model_function_wrapper on the MODEL, so every call ComfyUI makes is
seen), samples per second, peak memory (CUDA: torch.cuda.max_memory_allocated since the stage began; CPU: the
process's peak resident set size since the stage began, VmHWM reset through /proc/self/clear_refs) and ComfyUI's
model load requests. JSON with ``--json``.

The SD1.5-architecture checkpoint is generated locally (``random_sd15.py``: 859.52 M UNet, 123.06 M CLIP text,
83.65 M VAE parameters; 2.1 GB fp16) and loaded by the stock CheckpointLoaderSimple. ``--work-dir`` keeps it for the
next run. ``--arch sdxl``: the SDXL-base architecture (``random_sdxl.py``: 2,567.46 M UNet, 123.06 M CLIP-L,
694.66 M OpenCLIP-G, 83.65 M VAE parameters; 6.9 GB fp16) at 1024 px, on a CUDA device only (refused on a CPU
unless ``--tiny``, which uses the tiny SDXL stand-in of tests/support)."""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

# OpenMP threads that spin while waiting make every small op take tens of milliseconds when the CPU is shared
# (measured on a 2-core machine under load: a tiny-model UNet call 5-12 s with the default policy, 0.06 s with
# PASSIVE). Set before torch is imported; recorded in the JSON.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SUPPORT = ROOT / "tests" / "support"

SEED_PAIRS = [(1805, 2821), (1405, 2421), (1705, 2721)]
CONCEPT = "a photo of the parachute"
TRAIN_SEED = 2024

# Memory modes: what the pack's nodes get. "default" is meant to fit an 8 GB card at 512 px, "low" a 6 GB card
# (benchmarks/NOTES.md has the arithmetic).
MEMORY_MODES = {
    "default": {"train_batch_size": 4, "train_accumulation": 1, "gradient_checkpointing": False},
    "low": {"train_batch_size": 4, "train_accumulation": 1, "gradient_checkpointing": True},
}

# --attention: the ComfyUI command-line flag that selects each implementation ("auto" sets none).
ATTENTION_FLAGS = {"pytorch": "use_pytorch_cross_attention", "sub_quad": "use_quad_cross_attention",
                   "split": "use_split_cross_attention"}


# --arch: what each architecture's random model is and where it may run.
ARCHS = {
    "sd15": {"size": 512, "gpu_only": False, "why_gpu": ""},
    "sdxl": {"size": 1024, "gpu_only": True,
             "why_gpu": "a random SDXL-base model (2.57 B UNet parameters, 6.9 GB checkpoint) at 1024 px would "
                        "take hours per stage on a CPU"},
}


# -- command line --------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15", choices=list(ARCHS),
                   help="model architecture (random weights): sd15 (default, 512 px) or sdxl (SDXL base, 1024 px, "
                        "GPU only; with --tiny the tiny SDXL stand-in on the CPU)")
    p.add_argument("--tiny", action="store_true",
                   help="the tiny test model on the CPU with reduced sizes (64 px, 10 steps from 3, 10 training "
                        "updates, 2 baseline updates): a smoke test, not a measurement")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | cuda:N (default auto: cuda when available; --tiny: cpu)")
    p.add_argument("--size", type=int, default=None,
                   help="image size in pixels (default 512, --arch sdxl 1024; --tiny: 64)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; --tiny: 10)")
    p.add_argument("--start-at-step", type=int, default=None,
                   help="step where regeneration starts (default 15; --tiny: 3)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--refine", type=int, default=0, help="inversion refine_iterations (default 0)")
    p.add_argument("--train-steps", type=int, default=None, help="LoRA optimizer updates (default 500; --tiny: 10)")
    p.add_argument("--baseline-train-steps", type=int, default=None,
                   help="updates the baseline actually runs; its time is extrapolated to --train-steps "
                        "(default 50; --tiny: 2; 0 = run all of them)")
    p.add_argument("--train-precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="MemoRa LoRA Train precision for the pack's pipeline (default auto: what ComfyUI runs the "
                        "model in)")
    p.add_argument("--low-memory", action="store_true",
                   help="the low-memory mode: training with gradient checkpointing (inversion and regeneration "
                        "split their latent batch by ComfyUI's memory estimate in either mode)")
    p.add_argument("--vram-budget", type=float, default=None,
                   help="CUDA only: behave as on a card with this many GiB: caps PyTorch's allocator and what "
                        "ComfyUI believes is free, so the run fails (OOM) if it would not fit")
    p.add_argument("--attention", default="auto", choices=["auto", *ATTENTION_FLAGS],
                   help="ComfyUI's attention implementation (auto: ComfyUI's own choice: PyTorch SDPA on NVIDIA, "
                        "sub-quadratic on the CPU)")
    p.add_argument("--compile", default="none", choices=["none", "inductor", "cudagraphs"],
                   help="put the pack's sampling stages (seeds, inversion, regeneration) through ComfyUI's core "
                        "TorchCompileModel with this backend (training uses the plain model); compile time lands "
                        "in the seeds stage (default none)")
    p.add_argument("--no-baseline", action="store_true", help="skip the reference-pattern baseline")
    p.add_argument("--stages", default="all",
                   help="comma-separated subset of seeds,inversion,regeneration,training (the stages before a "
                        "selected one still run; default all)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--comfyui", type=Path, default=None, help="ComfyUI checkout (default $COMFYUI_PATH or "
                                                              "~/comfy/ComfyUI)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="ComfyUI base directory (models, outputs); kept, and the generated checkpoint reused, "
                        "when given; default a temporary folder removed at the end")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="less ComfyUI logging")
    return _finish_args(p, p.parse_args(argv))


def _finish_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on --tiny / --arch, and the checks that need them (argparse errors, exit status 2)."""
    tiny = a.tiny
    a.size = a.size or (64 if tiny else ARCHS[a.arch]["size"])
    a.steps = a.steps or (10 if tiny else 50)
    a.start_at_step = a.start_at_step if a.start_at_step is not None else (3 if tiny else 15)
    a.train_steps = a.train_steps if a.train_steps is not None else (10 if tiny else 500)
    if a.baseline_train_steps is None:
        a.baseline_train_steps = 2 if tiny else 50
    if a.baseline_train_steps <= 0 or a.baseline_train_steps > a.train_steps:
        a.baseline_train_steps = a.train_steps
    if a.size % 8:
        p.error("--size must be a multiple of 8")
    if not 0 <= a.start_at_step < a.steps:
        p.error("--start-at-step must be in 0..steps-1")
    if a.train_steps < 1:
        p.error("--train-steps must be >= 1")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "auto":  # --tiny is a CPU smoke test, also on a machine with a GPU
        a.device = "cpu" if tiny else ("cuda" if torch.cuda.is_available() else "cpu")
    if tiny and a.device != "cpu":
        p.error("--tiny runs on the CPU")
    if ARCHS[a.arch]["gpu_only"] and not tiny and not a.device.startswith("cuda"):
        p.error(f"--arch {a.arch} runs on a CUDA GPU only (device here: {a.device}): {ARCHS[a.arch]['why_gpu']}. Run "
                f"it on a machine with an NVIDIA GPU, or add --tiny for the tiny {a.arch} stand-in on the CPU "
                f"(a smoke test, not a measurement)")
    a.mode = "low" if a.low_memory else "default"
    stages = {"seeds", "inversion", "regeneration", "training"}
    a.stage_set = stages if a.stages == "all" else {s.strip() for s in a.stages.split(",") if s.strip()}
    if not a.stage_set <= stages:
        p.error(f"--stages: unknown {sorted(a.stage_set - stages)}")
    return a


# -- measuring -----------------------------------------------------------------------------------------------------
class UNetCounter:
    """A ComfyUI model_function_wrapper that counts UNet calls and the batch items they carry."""

    def __init__(self):
        self.calls = 0
        self.items = 0
        self.batch_sizes: collections.Counter = collections.Counter()

    def __call__(self, apply_model, args):
        x = args["input"]
        self.calls += 1
        self.items += int(x.shape[0])
        self.batch_sizes[int(x.shape[0])] += 1
        return apply_model(x, args["timestep"], **args["c"])

    def snapshot(self):
        return self.calls, self.items, collections.Counter(self.batch_sizes)

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options: keep counting here
        return self


class LoadCounter:
    """Counts ComfyUI's model load requests (LoadedModel.model_load: called for every model a sampler, encoder or
    decoder needs, whether or not its weights have to move; a move or re-patch happens inside when needed)."""

    def __init__(self):
        self.count = 0
        self._orig = None

    def install(self):
        import comfy.model_management as mm

        cls = getattr(mm, "LoadedModel", None)
        if cls is None or not hasattr(cls, "model_load"):
            return
        orig = cls.model_load
        counter = self

        def model_load(self_, *args, **kwargs):
            counter.count += 1
            return orig(self_, *args, **kwargs)

        self._orig = (cls, orig)
        cls.model_load = model_load

    def uninstall(self):
        if self._orig is not None:
            cls, orig = self._orig
            cls.model_load = orig
            self._orig = None


class Memory:
    """Peak memory since ``reset``: CUDA allocator peak, or the process's peak RSS (VmHWM) on the CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.can_reset_rss = False
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.can_reset_rss = True
            except OSError:
                pass

    @property
    def kind(self) -> str:
        if self.cuda:
            return "cuda_max_memory_allocated"
        return "cpu_peak_rss" if self.can_reset_rss else "cpu_peak_rss_since_process_start"

    def reset(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.can_reset_rss:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def current(self) -> int:
        import torch

        if self.cuda:
            return int(torch.cuda.memory_allocated())
        return _proc_status_kb("VmRSS") * 1024

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        hwm = _proc_status_kb("VmHWM")
        if hwm:
            return hwm * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _proc_status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Recorder:
    """Times stages and collects their figures."""

    def __init__(self, counter: UNetCounter, loads: LoadCounter, memory: Memory, device: str):
        self.counter = counter
        self.loads = loads
        self.memory = memory
        self.device = device
        self.results: dict[str, list[dict]] = collections.defaultdict(list)

    @contextlib.contextmanager
    def stage(self, pipeline: str, name: str, samples: int, unit: str, **extra):
        import torch

        rec: dict[str, Any] = {"stage": name, "samples": int(samples), "unit": unit, **extra}
        self.memory.reset()
        rec["memory_at_start_bytes"] = self.memory.current()
        c0, i0, b0 = self.counter.snapshot()
        l0 = self.loads.count
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        try:
            yield rec
        finally:
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            c1, i1, b1 = self.counter.snapshot()
            rec["wall_s"] = wall
            rec["process_cpu_s"] = time.process_time() - cpu0  # robust to other processes on a shared CPU
            rec["unet_calls"] = c1 - c0
            rec["unet_items"] = i1 - i0
            rec["unet_batch_sizes"] = {str(k): b1[k] - b0.get(k, 0) for k in sorted(b1) if b1[k] - b0.get(k, 0)}
            rec["samples_per_s"] = samples / wall if wall > 0 else None
            rec["unet_items_per_s"] = rec["unet_items"] / wall if wall > 0 else None
            rec["peak_memory_bytes"] = self.memory.peak()
            rec["peak_memory_kind"] = self.memory.kind
            rec["model_load_requests"] = self.loads.count - l0
            self.results[pipeline].append(rec)
            _print_stage(pipeline, rec)


def _gib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 2 ** 30:.2f}"


def _print_stage(pipeline: str, r: dict):
    sps = r.get("samples_per_s")
    extra = f"  (extrapolated to {r['wall_s_extrapolated']:.2f} s)" if "wall_s_extrapolated" in r else ""
    print(f"[{pipeline:8s}] {r['stage']:22s} {r['wall_s']:9.3f} s  unet calls {r['unet_calls']:6d}  items "
          f"{r['unet_items']:7d}  {r['samples']:5d} {r['unit']:<10s} {sps or 0:9.3f}/s  peak {_gib(r['peak_memory_bytes'])}"
          f" GiB  load requests {r['model_load_requests']}{extra}", flush=True)


# -- ComfyUI -------------------------------------------------------------------------------------------------------
def configure_comfy_args(a: argparse.Namespace, comfy_path: Path):
    """ComfyUI's command-line options, set before comfy.model_management is imported."""
    if str(comfy_path) not in sys.path:
        sys.path.insert(0, str(comfy_path))
    if a.device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = a.device.split(":", 1)[1]
    from comfy.cli_args import args

    if a.device == "cpu":
        args.cpu = True
    if a.attention in ATTENTION_FLAGS:
        setattr(args, ATTENTION_FLAGS[a.attention], True)


def apply_vram_budget(budget_gib: float):
    """Make this process behave as on a card with ``budget_gib`` GiB: the allocator refuses more, and ComfyUI's
    free-memory figure (which decides cond/uncond batching and model offloading) never exceeds what is left."""
    import torch

    import comfy.model_management as mm

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    budget = int(budget_gib * 2 ** 30)
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
    orig_free = mm.get_free_memory

    def get_free_memory(dev=None, torch_free_too=False):
        r = orig_free(dev, torch_free_too)
        if dev is not None and getattr(dev, "type", None) != "cuda":
            return r
        cap = max(0, budget - torch.cuda.memory_allocated())
        if torch_free_too:
            return min(r[0], cap), min(r[1], cap)
        return min(r, cap)

    mm.get_free_memory = get_free_memory
    orig_total = mm.get_total_memory

    def get_total_memory(dev=None, torch_total_too=False):
        r = orig_total(dev, torch_total_too)
        if dev is not None and getattr(dev, "type", None) != "cuda":
            return r
        if torch_total_too:
            return min(r[0], budget), min(r[1], budget)
        return min(r, budget)

    mm.get_total_memory = get_total_memory


def boot_comfy(a: argparse.Namespace, comfy_path: Path, base: Path):
    from memora_batch.embedded import EmbeddedComfy

    cn = base / "custom_nodes"
    cn.mkdir(parents=True, exist_ok=True)
    packs = []
    if a.tiny:
        kit = cn / "memora_testkit"
        if not kit.exists():
            kit.symlink_to(SUPPORT / "memora_testkit", target_is_directory=True)
        packs.append(kit)
    link = cn / "comfyui-memora"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    packs.append(link)
    return EmbeddedComfy.boot(comfy_path, packs, base_directory=base, cpu=(a.device == "cpu"))


def pack_module(name: str):
    """A module of this pack as ComfyUI loaded it (the pack's package name is derived from its path)."""
    init = (ROOT / "__init__.py").resolve()
    for mod_name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve() == init:
            return importlib.import_module(f"{mod_name}.{name}")
    raise RuntimeError("the pack is not loaded in ComfyUI (its import failed: see the log above)")


def call_node(class_type: str, **inputs):
    """Run a node the way the executor does (inference mode; V3 nodes through a prepared class clone)."""
    import torch

    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    with torch.inference_mode():
        if hasattr(cls, "PREPARE_CLASS_CLONE"):
            out = cls.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(**inputs)
            return tuple(out.args)
        obj = cls()
        return tuple(getattr(obj, cls.FUNCTION)(**inputs))


# -- the model -----------------------------------------------------------------------------------------------------
def build_checkpoint(a: argparse.Namespace, base: Path) -> tuple[str, dict]:
    import folder_paths

    folder = base / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    # When ComfyUI was already booted in this process (e.g. by the test harness) with another base directory.
    folder_paths.add_model_folder_path("checkpoints", str(folder))
    t0 = time.perf_counter()
    if a.tiny:
        if str(SUPPORT) not in sys.path:
            sys.path.insert(0, str(SUPPORT))
        import tiny_models

        if a.arch == "sdxl":
            name = f"memora_bench_tiny_sdxl_seed{a.model_seed}.safetensors"
            build, info = tiny_models.build_tiny_sdxl_checkpoint, {"architecture": "tiny SDXL (tests/support)"}
        else:
            name = f"memora_bench_tiny_seed{a.model_seed}.safetensors"
            build, info = tiny_models.build_tiny_checkpoint, {"architecture": "tiny SD1.x (tests/support/tiny_models.py)"}
        path = folder / name
        if not path.exists():
            build(path, seed=a.model_seed)
    elif a.arch == "sdxl":
        import random_sdxl

        name = f"memora_bench_sdxl_random_seed{a.model_seed}_fp16.safetensors"
        path = random_sdxl.write_checkpoint(folder / name, seed=a.model_seed)
        info = {"architecture": "SDXL base (random weights, benchmarks/random_sdxl.py)",
                "parameters": random_sdxl.parameter_counts()}
    else:
        import random_sd15

        name = f"memora_bench_sd15_random_seed{a.model_seed}_fp16.safetensors"
        path = random_sd15.write_checkpoint(folder / name, seed=a.model_seed)
        info = {"architecture": "SD1.5 (random weights, benchmarks/random_sd15.py)",
                "parameters": random_sd15.parameter_counts()}
    info["checkpoint_bytes"] = path.stat().st_size
    info["build_s"] = time.perf_counter() - t0
    return name, info


def model_facts(model, clip, vae) -> dict:
    import comfy.model_management as mm

    base = model.model
    unet_params = sum(p.numel() for p in base.diffusion_model.parameters())
    facts = {
        "model_config": next((c.__name__ for c in type(base.model_config).__mro__
                              if c.__module__ == "comfy.supported_models"), type(base.model_config).__name__),
        "model_type": getattr(base.model_type, "name", str(base.model_type)),
        "unet_parameters": unet_params,
        "unet_weight_dtype": str(base.get_dtype()),
        "unet_compute_dtype": str(getattr(base, "manual_cast_dtype", None) or base.get_dtype()),
        "clip_parameters": sum(p.numel() for p in clip.cond_stage_model.parameters()),
        "vae_parameters": sum(p.numel() for p in vae.first_stage_model.parameters()),
        "vae_dtype": str(getattr(vae, "vae_dtype", None)),
        "load_device": str(model.load_device),
        "pytorch_attention": bool(mm.pytorch_attention_enabled()),
        "xformers": bool(mm.xformers_enabled()),
    }
    try:
        import comfy.ldm.modules.attention as attn

        facts["attention_function"] = attn.optimized_attention.__name__
    except Exception:
        pass
    return facts


# -- the pipelines -------------------------------------------------------------------------------------------------
def split_pairs(samples):
    """Seeds are ordered a1, b1, a2, b2, a3, b3: item i of A pairs with item i of B."""
    return samples[0::2].contiguous(), samples[1::2].contiguous()


def seed_noise(seeds, latent):
    """ComfyUI's noise for each seed at batch 1 (what KSampler draws), concatenated."""
    import torch

    import comfy.sample

    one = latent[:1]
    return torch.cat([comfy.sample.prepare_noise(one, s) for s in seeds])


def max_diff(x, y) -> Optional[float]:
    if x is None or y is None or tuple(x.shape) != tuple(y.shape):
        return None
    return float((x.float() - y.float()).abs().max())


class Pipelines:
    def __init__(self, a, rec: Recorder, model, clip, vae, pack):
        self.a = a
        self.rec = rec
        self.model = model
        self.sampling_model = model
        if a.compile != "none":
            self.sampling_model = call_node("TorchCompileModel", model=model, backend=a.compile)[0]
        self.clip = clip
        self.vae = vae
        self.pack = pack
        self.mode = dict(MEMORY_MODES[a.mode])
        self.seeds = [s for pair in SEED_PAIRS for s in pair]
        self.latent_hw = (a.size // 8, a.size // 8)
        self.outputs: dict[str, dict] = collections.defaultdict(dict)
        self.extra: dict[str, Any] = {}

    # ---- shared pieces
    def encode_text(self, pipeline: str):
        with self.rec.stage(pipeline, "text_encode", 2, "prompts"):
            pos = call_node("CLIPTextEncode", clip=self.clip, text=CONCEPT)[0]
            neg = call_node("CLIPTextEncode", clip=self.clip, text="")[0]
        return pos, neg

    def _inv_kwargs(self, pos, neg, model=None):
        return dict(model=model or self.model, positive=pos, negative=neg, steps=self.a.steps,
                    start_at_step=self.a.start_at_step, cfg=self.a.cfg, schedule="exact")

    # ---- this pack's way
    def run_memora(self):
        import torch

        a = self.a
        P = "memora"
        out = self.outputs[P]
        pos, neg = self.encode_text(P)
        latent0 = torch.zeros([len(self.seeds), 4, *self.latent_hw])
        with self.rec.stage(P, "seeds", len(self.seeds), "images"):
            import comfy.sample

            noise = seed_noise(self.seeds, latent0)
            with torch.inference_mode():
                seeds = comfy.sample.sample(self.sampling_model, noise, a.steps, a.cfg, "ddim", "ddim_uniform", pos, neg,
                                            latent0, denoise=1.0, seed=self.seeds[0]).cpu()
        out["seeds"] = seeds
        with self.rec.stage(P, "seed_decode_encode", len(self.seeds), "images"):
            images = call_node("VAEDecode", vae=self.vae, samples={"samples": seeds})[0]
            clean = call_node("VAEEncode", vae=self.vae, pixels=images)[0]
        if not ({"inversion", "regeneration", "training"} & a.stage_set):
            return
        with self.rec.stage(P, "inversion", len(self.seeds), "latents"):
            inv = call_node("MemoRaDDIMInversion", latent=clean, refine_iterations=a.refine,
                            **self._inv_kwargs(pos, neg, self.sampling_model))[0]
        out["inversion"] = inv["samples"]
        with self.rec.stage(P, "slerp", 33, "latents"):
            la, lb = split_pairs(inv["samples"])
            sl = call_node("MemoRaSlerpLatents", latent_a={"samples": la}, latent_b={"samples": lb}, intervals=10,
                           include_endpoints=True)[0]
        n = int(sl["samples"].shape[0])
        if not ({"regeneration", "training"} & a.stage_set):
            return
        with self.rec.stage(P, "regeneration", n, "latents"):
            regen = call_node("MemoRaRegenerate", latent=sl, **self._inv_kwargs(pos, neg, self.sampling_model))[0]
        out["regeneration"] = regen["samples"]
        with self.rec.stage(P, "regeneration_decode", n, "images"):
            call_node("VAEDecode", vae=self.vae, samples=regen)
        if "training" not in a.stage_set:
            return
        m = self.mode
        with self.rec.stage(P, "training", a.train_steps * 4, "samples", updates=a.train_steps,
                            batch_size=m["train_batch_size"], gradient_accumulation=m["train_accumulation"],
                            gradient_checkpointing=m["gradient_checkpointing"], precision=a.train_precision):
            res = call_node("MemoRaLoRATrain", model=self.model, latents=regen, positive=pos, steps=a.train_steps,
                            rank=4, alpha=4.0, learning_rate=1e-4, lr_schedule="cosine",
                            batch_size=m["train_batch_size"], gradient_accumulation=m["train_accumulation"],
                            targets="attention", random_flip=True, precision=a.train_precision,
                            gradient_checkpointing=m["gradient_checkpointing"], seed=TRAIN_SEED, save_name="")
        loss = res[2]["loss"] if isinstance(res[2], dict) else None
        out["train_losses"] = loss
        self.extra["memora_final_loss"] = loss[-1] if loss else None

    # ---- the reference's pattern
    def run_baseline(self):
        import torch

        a = self.a
        P = "baseline"
        out = self.outputs[P]
        pos, neg = self.encode_text(P)
        with self.rec.stage(P, "seeds", len(self.seeds), "images"):
            seeds = []
            for s in self.seeds:
                lat = {"samples": torch.zeros([1, 4, *self.latent_hw])}
                seeds.append(call_node("KSampler", model=self.model, seed=s, steps=a.steps, cfg=a.cfg,
                                       sampler_name="ddim", scheduler="ddim_uniform", positive=pos, negative=neg,
                                       latent_image=lat, denoise=1.0)[0]["samples"])
            seeds = torch.cat(seeds)
        out["seeds"] = seeds
        with self.rec.stage(P, "seed_decode_encode", len(self.seeds), "images"):
            clean = []
            for i in range(seeds.shape[0]):
                img = call_node("VAEDecode", vae=self.vae, samples={"samples": seeds[i:i + 1]})[0]
                clean.append(call_node("VAEEncode", vae=self.vae, pixels=img)[0]["samples"])
            clean = torch.cat(clean)
        if not ({"inversion", "regeneration", "training"} & a.stage_set):
            return
        with self.rec.stage(P, "inversion", len(self.seeds), "latents"):
            inv = torch.cat([call_node("MemoRaDDIMInversion", latent={"samples": clean[i:i + 1]},
                                       refine_iterations=a.refine, **self._inv_kwargs(pos, neg))[0]["samples"]
                             for i in range(clean.shape[0])])
        out["inversion"] = inv
        with self.rec.stage(P, "slerp", 33, "latents"):
            la, lb = split_pairs(inv)
            sl = call_node("MemoRaSlerpLatents", latent_a={"samples": la}, latent_b={"samples": lb}, intervals=10,
                           include_endpoints=True)[0]["samples"]
        n = int(sl.shape[0])
        if not ({"regeneration", "training"} & a.stage_set):
            return
        with self.rec.stage(P, "regeneration", n, "latents"):
            regen = torch.cat([call_node("MemoRaRegenerate", latent={"samples": sl[i:i + 1]},
                                         **self._inv_kwargs(pos, neg))[0]["samples"] for i in range(n)])
        out["regeneration"] = regen
        with self.rec.stage(P, "regeneration_decode", n, "images"):
            images = torch.cat([call_node("VAEDecode", vae=self.vae, samples={"samples": regen[i:i + 1]})[0]
                                for i in range(n)])
        if "training" not in a.stage_set:
            return
        self._baseline_training(pos, regen, images)

    def _baseline_training(self, pos, regen, images):
        """Batch 1 x 4 accumulation, gradient checkpointing, fp16 on a GPU, and per micro-step a VAE encode of one
        image and a text-encoder pass (the reference's data loader and text encoder run at every micro-step)."""
        import torch

        a = self.a
        th = self.pack["train_host"]
        recipe_mod = self.pack["recipe"]
        steps = int(a.baseline_train_steps)
        recipe = recipe_mod.LoRARecipe(steps=steps, rank=4, alpha=4.0, learning_rate=1e-4, lr_schedule="cosine",
                                       batch_size=1, gradient_accumulation=4, targets="attention", random_flip=True,
                                       seed=TRAIN_SEED).validate()
        precision = "fp16" if a.device.startswith("cuda") else "auto"
        tokens = self.clip.tokenize(CONCEPT)
        state = {"i": 0, "update_times": [], "encode_s": 0.0}
        cuda = a.device.startswith("cuda")

        def on_micro_step(update, micro):
            i = state["i"] % images.shape[0]
            state["i"] += 1
            t0 = time.perf_counter()
            with torch.inference_mode():
                self.vae.encode(images[i:i + 1])
                self.clip.encode_from_tokens_scheduled(tokens)
            if cuda:
                torch.cuda.synchronize()
            state["encode_s"] += time.perf_counter() - t0

        def on_update(info):
            state["update_times"].append(time.perf_counter())

        with self.rec.stage("baseline", "training", steps * 4, "samples", updates=steps, batch_size=1,
                            gradient_accumulation=4, gradient_checkpointing=True, precision=precision,
                            vae_and_text_encoder_per_micro_step=True) as r:
            t0 = time.perf_counter()
            with torch.inference_mode():  # as under the executor; train_on_model leaves inference mode itself
                run = th.train_on_model(self.model, pos, regen, recipe, precision, True,
                                        on_update=on_update, on_micro_step=on_micro_step)
            ts = state["update_times"]
            r["vae_text_encoder_s"] = state["encode_s"]
            if steps < a.train_steps and len(ts) >= 2:
                per_update = (ts[-1] - ts[0]) / (len(ts) - 1)
                measured = time.perf_counter() - t0
                r["per_update_s"] = per_update
                r["wall_s_extrapolated"] = measured + per_update * (a.train_steps - steps)
                r["extrapolated_to_updates"] = a.train_steps
                r["extrapolation_factor"] = a.train_steps / steps
            self.extra["baseline_final_loss"] = run.result.losses[-1] if run.result.losses else None


# -- expected counts -----------------------------------------------------------------------------------------------
def ladder_steps(model, steps: int, start_at_step: int = 0) -> int:
    """Model evaluations of a DDIM run over ComfyUI's ddim_uniform ladder from ``start_at_step``: usually
    ``steps - start_at_step``, but ddim_uniform yields one more sigma when ``steps`` does not divide the training
    timesteps (e.g. 7 for steps 6)."""
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps)
    return int(len(sigmas) - 1 - start_at_step)


def expected_calls(a: argparse.Namespace, model, n_images: int = 6, n_slerp: int = 33,
                   accumulation: int = 1) -> dict:
    """UNet calls when each batch and its CFG pair go through one call (what ComfyUI's memory estimate allows when
    memory is plentiful; with less, cond and uncond go separately and the pack splits the latent batch: the
    stages' unet_batch_sizes show it), per stage and pipeline."""
    full = ladder_steps(model, a.steps)
    k = ladder_steps(model, a.steps, a.start_at_step)
    return {
        "ladder_steps": {"seeds": full, "inversion_regeneration": k},
        "memora": {"seeds": full, "inversion": k * (1 + a.refine), "regeneration": k,
                   "training": a.train_steps * accumulation},
        "baseline": {"seeds": full * n_images, "inversion": k * (1 + a.refine) * n_images,
                     "regeneration": k * n_slerp, "training": a.baseline_train_steps * 4},
    }


# -- summary -------------------------------------------------------------------------------------------------------
GROUPS = {
    "inversion_regeneration": ("inversion", "slerp", "regeneration"),
    "training": ("training",),
    "end_to_end": None,
}


def _stage_time(r: dict) -> float:
    return float(r.get("wall_s_extrapolated", r["wall_s"]))


def summarise(results: dict[str, list[dict]]) -> dict:
    out = {}
    for pipe, stages in results.items():
        by = {r["stage"]: r for r in stages}
        groups = {}
        for g, names in GROUPS.items():
            sel = [r for r in stages if names is None or r["stage"] in names]
            groups[g] = {"wall_s": sum(_stage_time(r) for r in sel),
                         "unet_calls": int(round(sum(r["unet_calls"] * r.get("extrapolation_factor", 1.0)
                                                     for r in sel))),
                         "peak_memory_bytes": max((r["peak_memory_bytes"] for r in sel), default=0)}
        out[pipe] = {"groups": groups, "stages": list(by)}
    if "memora" in out and "baseline" in out:
        out["speedup"] = {g: (out["baseline"]["groups"][g]["wall_s"] / out["memora"]["groups"][g]["wall_s"]
                              if out["memora"]["groups"][g]["wall_s"] > 0 else None) for g in GROUPS}
    return out


def environment(a, comfy) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "comfyui_version": getattr(comfy, "version", "unknown"),
           "comfyui_path": str(comfy.comfy_path), "device": a.device,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    try:
        env["torch_threads"] = torch.get_num_threads()
    except Exception:
        pass
    if a.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["gpu"] = props.name
        env["gpu_memory_bytes"] = int(props.total_memory)
    try:
        env["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                 if ln.startswith("model name")), None)
        env["load_average"] = os.getloadavg()
    except Exception:
        pass
    return env


def main(argv=None) -> dict:
    a = parse_args(argv)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from memora_batch.embedded import find_comfyui

    comfy_path = find_comfyui(str(a.comfyui) if a.comfyui else None)
    if comfy_path is None:
        raise SystemExit("no ComfyUI checkout: pass --comfyui or set COMFYUI_PATH")
    configure_comfy_args(a, comfy_path)
    tmp = None
    base = a.work_dir
    if base is None:
        tmp = tempfile.mkdtemp(prefix="memora_bench_")
        base = Path(tmp)
    base = base.resolve()
    base.mkdir(parents=True, exist_ok=True)
    import logging

    root_level = logging.getLogger().level
    if a.quiet:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return _run(a, comfy_path, base)
    finally:
        logging.getLogger().setLevel(root_level)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(a, comfy_path: Path, base: Path) -> dict:
    t_boot = time.perf_counter()
    comfy = boot_comfy(a, comfy_path, base)
    boot_s = time.perf_counter() - t_boot

    if a.vram_budget is not None:
        if not a.device.startswith("cuda"):
            raise SystemExit("--vram-budget needs a CUDA device")
        apply_vram_budget(a.vram_budget)
    pack = {"train_host": pack_module("nodes._train_host"), "recipe": pack_module("memora.lora.recipe")}
    memory = Memory(a.device)
    loads = LoadCounter()
    loads.install()
    try:
        return _measure(a, comfy, boot_s, pack, memory, loads, base)
    finally:
        loads.uninstall()


def _measure(a, comfy, boot_s, pack, memory, loads, base) -> dict:
    import torch

    ckpt, model_info = build_checkpoint(a, base)
    t0 = time.perf_counter()
    memory.reset()
    model, clip, vae = call_node("CheckpointLoaderSimple", ckpt_name=ckpt)[:3]
    model_info["load_s"] = time.perf_counter() - t0
    model_info["load_peak_memory_bytes"] = memory.peak()
    counter = UNetCounter()
    model = model.clone()
    model.set_model_unet_function_wrapper(counter)
    model_info.update(model_facts(model, clip, vae))
    print(f"model: {model_info['architecture']}, UNet {model_info['unet_parameters'] / 1e6:.2f} M params "
          f"({model_info['unet_weight_dtype']}), CLIP {model_info['clip_parameters'] / 1e6:.2f} M, VAE "
          f"{model_info['vae_parameters'] / 1e6:.2f} M on {model_info['load_device']}; attention "
          f"{model_info.get('attention_function')}", flush=True)

    rec = Recorder(counter, loads, memory, a.device)
    pipes = Pipelines(a, rec, model, clip, vae, pack)
    torch.manual_seed(0)
    pipes.run_memora()
    if not a.no_baseline:
        pipes.run_baseline()

    mode = pipes.mode
    result = {
        "benchmark": "memora_pipeline",
        "config": {"arch": a.arch, "tiny": a.tiny, "size": a.size, "steps": a.steps, "start_at_step": a.start_at_step,
                   "cfg": a.cfg, "refine_iterations": a.refine, "images": 6, "slerp_latents": 33,
                   "train_steps": a.train_steps, "baseline_train_steps": a.baseline_train_steps,
                   "effective_batch": 4, "train_precision": a.train_precision, "memory_mode": a.mode,
                   "memory_mode_settings": mode,
                   "attention": a.attention, "compile": a.compile, "vram_budget_gib": a.vram_budget, "device": a.device,
                   "stages": sorted(a.stage_set), "baseline": not a.no_baseline},
        "environment": environment(a, comfy),
        "comfyui_boot_s": boot_s,
        "model": model_info,
        "stages": dict(rec.results),
        "summary": summarise(rec.results),
        "expected_unet_calls": expected_calls(a, model, accumulation=mode["train_accumulation"]),
        "checks": {},
        "losses": {k: v for k, v in pipes.extra.items() if k.endswith("loss")},
    }
    mo, bo = pipes.outputs.get("memora", {}), pipes.outputs.get("baseline", {})
    for key in ("seeds", "inversion", "regeneration"):
        d = max_diff(mo.get(key), bo.get(key))
        if d is not None:
            result["checks"][f"{key}_max_abs_diff_batched_vs_per_image"] = d
    _print_summary(result)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_name(a.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(a.json)
        print(f"wrote {a.json}")
    return result


def _print_summary(result: dict):
    s = result["summary"]
    print("\nsummary (wall s; baseline training extrapolated where it ran fewer updates)")
    for g in GROUPS:
        row = [f"{g:24s}"]
        for pipe in ("memora", "baseline"):
            if pipe in s:
                row.append(f"{pipe} {s[pipe]['groups'][g]['wall_s']:10.2f} s ({s[pipe]['groups'][g]['unet_calls']} "
                           f"calls)")
        if "speedup" in s and s["speedup"][g]:
            row.append(f"speed-up x{s['speedup'][g]:.2f}")
        print("  ".join(row))
    for k, v in result["checks"].items():
        print(f"check {k}: {v:.3g}")


if __name__ == "__main__":
    main()
