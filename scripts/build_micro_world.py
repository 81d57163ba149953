#!/usr/bin/env python
"""Build the MemoRa micro world from scratch on a CPU: data, VAE, text encoder, detector, original / never-learned
UNets (phases 1-3), the unlearned variants (ESD-x, ESD-u, UCE, ...), measurements, and the shipped safetensors +
manifest.

    python scripts/build_micro_world.py                  # writes memora/micro/weights/
    python scripts/build_micro_world.py --out /tmp/mw    # somewhere else

Seeded end to end (one seed per stage, written to the manifest). The networks are ComfyUI's own ldm classes
(UNetModel, AutoencoderKL) so the weights load in ComfyUI without any key conversion: a ComfyUI checkout is needed
($COMFYUI_PATH, else ~/comfy/ComfyUI). The main process uses --threads torch threads (default 2); the original and
never-learned UNets train in two worker processes of one thread each (--jobs 2, the default), which on a 2-core
machine halves that stage's wall time. The shipped (calibrated) world: phase 3 and everything after it from a v2.1
build's phase-2 UNets (--reuse-phase2) took 17.4 minutes on 2 cores, a build from the seeds about 51 minutes is
expected (not timed end to end); --reuse DIR redoes only the variants and the measurements (8-15 minutes). See
docs/micro-world.md for the recipe, the build times and the measured results.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from memora.evaluation.stats import rate_record  # noqa: E402
from memora.fileio import atomic_write  # noqa: E402
from memora.micro import data, detector, text, world  # noqa: E402
from memora_build import micro_detector, micro_diffusion as diffusion, micro_erasure as erasure, micro_text  # noqa: E402
from memora_build.micro_files import save_safetensors  # noqa: E402

UNET_EMA = 0.99
FINETUNE_EMA = 0.995
VAE_KL = 1e-6
VAE_LOWFREQ = 1.0
UNET_WARMUP = 30
UNET_MIN_SNR = 5.0
STAGE_SEEDS = {"data": 1, "vae": 2, "clip": 3, "detector": 4, "unet": 5, "finetune": 8, "eval": 7, "extras": 9,
               "calibrate": 8}
#: the scoring convention of every rate the build reports (memora.evaluation.stats.rate_record)
CONVENTION = "micro-top1"
#: the shipped detector's training length (helper 18b's run: train_detector(vae, 4, steps=900) on this VAE)
DETECTOR_STEPS = 900


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def boot_comfy():
    from memora_batch.embedded import find_comfyui

    path = find_comfyui()
    if path is None:
        sys.exit("no ComfyUI checkout found: set COMFYUI_PATH or put one at ~/comfy/ComfyUI")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = True
    return path


# -- architectures (ComfyUI's classes; comfy.ops layers are created uninitialised, so initialise them here) ----------
_BASES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def init_default(module: torch.nn.Module):
    for m in module.modules():
        for cls in type(m).__mro__:
            if cls in _BASES:
                cls.reset_parameters(m)
                break


def make_unet(seed: int):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(**world.UNET_CONFIG, operations=comfy.ops.disable_weight_init)
    init_default(unet)
    # ldm's zero_module init: the output conv, each res block's last conv and each transformer's proj_out start at 0
    with torch.no_grad():
        for name, m in unet.named_modules():
            if name == "out.2" or name.endswith("out_layers.3") or name.endswith("proj_out"):
                for p in m.parameters():
                    p.zero_()
    unet.micro_latent_hw = (latent_hw(), latent_hw())
    return unet


def make_vae(seed: int):
    from comfy.ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(embed_dim=world.VAE_EMBED_DIM, ddconfig=dict(world.VAE_DDCONFIG))
    init_default(vae)
    return vae


def latent_hw() -> int:
    return data.IMAGE_SIZE // world.VAE_DOWNSCALE


def use_fast_attention():
    """Training speed only: PyTorch SDPA instead of ComfyUI's CPU default (sub-quadratic attention); same maths."""
    import comfy.ldm.modules.attention as attn

    if hasattr(attn, "attention_pytorch"):
        attn.optimized_attention = attn.attention_pytorch


# -- VAE -----------------------------------------------------------------------------------------------------------
def vae_moments(vae, x):
    h = vae.quant_conv(vae.encoder(x))
    mean, logvar = h.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def train_vae(vae, x: torch.Tensor, *, steps: int, batch: int, lr: float, kl_weight: float, seed: int,
              lowfreq_weight: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    start = time.perf_counter()
    warm = max(1, steps // 20)
    vae.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = diffusion.cosine_lr(step, steps, lr, warm)
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb = x[idx]
        mean, logvar = vae_moments(vae, xb)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)
        rec = vae.decoder(vae.post_quant_conv(z))
        l_rec = (rec - xb).abs().mean() + (rec - xb).pow(2).mean()
        # colours live in the low frequencies: an extra MSE on 8x8 averages makes the tiny VAE learn them early
        pool = torch.nn.functional.avg_pool2d
        l_rec = l_rec + lowfreq_weight * (pool(rec, 8) - pool(xb, 8)).pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        loss = l_rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            losses.append([step, round(float(l_rec), 4), round(float(kl), 2)])
            log(f"  vae step {step}/{steps}: reconstruction {float(l_rec):.4f} kl {float(kl):.1f}")
    vae.eval()
    return {"losses (step, l1+mse, kl)": losses, "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def encode_means(vae, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae_moments(vae, x[i:i + batch])[0] for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def decode(vae, z: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.decoder(vae.post_quant_conv(z[i:i + batch])) for i in range(0, z.shape[0], batch)])


@torch.no_grad()
def standardize_latents(vae, mean: torch.Tensor, std: torch.Tensor):
    """Re-express the VAE's latent space exactly so that latents x 0.18215 (the SD1.x latent format) have zero mean
    and unit standard deviation per channel on the training images: z' = (z - mean) / std / 0.18215. quant_conv's
    posterior-mean rows take the affine map, its log-variance rows shift by 2 ln(scale), and post_quant_conv
    undoes it on its input (weights times 1 / scale per input channel, bias plus W @ mean)."""
    zc = world.VAE_DDCONFIG["z_channels"]
    k = (1.0 / (std * diffusion.LATENT_SCALE)).to(torch.float32)  # [zc]
    m = mean.to(torch.float32)
    w, b = vae.quant_conv.weight, vae.quant_conv.bias
    w[:zc].mul_(k.view(-1, 1, 1, 1))
    b[:zc].sub_(m).mul_(k)
    b[zc:].add_(2 * torch.log(k))
    pw, pb = vae.post_quant_conv.weight, vae.post_quant_conv.bias
    pb.add_((pw[:, :, 0, 0] * m.view(1, -1)).sum(1))
    pw.div_(k.view(1, -1, 1, 1))


# -- evaluation ----------------------------------------------------------------------------------------------------
def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def generate(unet, vae, ctx, uncond, n: int, seed: int, cfg: float, steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    hw = latent_hw()
    noise = torch.randn((n, 4, hw, hw), generator=g)
    z = diffusion.ddim_sample(unet, noise, ctx.unsqueeze(0), uncond, cfg=cfg, steps=steps)
    return decode(vae, z / diffusion.LATENT_SCALE)


def evaluate(unet, vae, det, contexts, uncond, *, n: int, seed: int, cfg: float, steps: int, judge=None,
             concepts: tuple = data.CONCEPTS) -> dict:
    """Each concept's prompt drawn ``n`` times (noise seed ``seed`` + concept index): per concept the count of
    images whose detector top class is the prompt's concept, the judge's labels (when a judge is given), and the
    first 8 images (uint8) for the contact sheet. ``concepts``: a subset (the same numbers per concept as all)."""
    counts, samples, labels = {}, {}, {}
    for concept in concepts:
        ci = data.CONCEPTS.index(concept)
        imgs = generate(unet, vae, contexts[ci], uncond, n, seed + ci, cfg, steps).clamp(-1, 1)
        probs = detector.probabilities(det, imgs)
        top = probs.argmax(-1)
        counts[concept] = int((top == ci).sum())
        samples[concept] = to_uint8(imgs[:8])
        entry = {"detector": [data.DETECTOR_CLASSES[i] for i in top.tolist()]}
        if judge is not None:
            entry["judge"] = list(judge(to_uint8(imgs)))
        labels[concept] = entry
    return {"counts": counts, "n": n, "samples": samples, "labels": labels}


# -- saving --------------------------------------------------------------------------------------------------------
def save_png(image, path: Path):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write(path, buf.getvalue(), replace=True)


@dataclass
class Built:
    """What stages 2-5 make (or ``--reuse`` loads): the networks, the prompts' embeddings and the stages' logs."""
    vae: object
    clip: object
    contexts: torch.Tensor
    uncond: torch.Tensor
    det: object
    unets: dict
    logs: dict = field(default_factory=dict)  # vae, clip, detector, unet
    reused: dict | None = None
    variants: dict = field(default_factory=dict)  # name -> (stored tensors, log) for the variants of the original


SHARED_ARGS = ("images_per_concept", "vae_steps", "size_scale")  # the VAE and the detector learn the drawn shapes
PHASE1_ARGS = ("images_per_concept", "vae_steps", "unet_steps", "unet_batch", "unet_lr", "erase",
               "size_scale", "unconditional_extras")
PHASE2_ARGS = ("finetune_models", "images_per_concept", "vae_steps", "unet_steps", "unet_batch", "unet_lr",
               "finetune_steps", "finetune_lr", "erase", "size_scale", "unconditional_extras")
CALIBRATE_ARGS = ("calibrate_steps", "calibrate_lr", "calibrate_guidance", "calibrate_size_scale")
REUSABLE_ARGS = PHASE2_ARGS + CALIBRATE_ARGS
#: what an earlier build's manifest means when it does not record an argument (it was built before the option existed)
ARG_DEFAULTS_BEFORE = {"size_scale": "", "unconditional_extras": 0, "calibrate_steps": 0, "calibrate_lr": 3e-4,
                       "calibrate_guidance": "", "calibrate_size_scale": ""}
#: --world NAME: the settings each named world is built with (an option given on the command line overrides its
#: preset); docs/micro-world.md describes each. "calibrated" is the shipped world.
WORLD_PRESETS = {
    "calibrated": {"size_scale": "", "unconditional_extras": 0, "calibrate_steps": 1000,
                   "calibrate_guidance": "triangle=3,circle=3", "calibrate_size_scale": "triangle=1.25,circle=0.85"},
    "v2.1": {"size_scale": "", "unconditional_extras": 0, "calibrate_steps": 0, "calibrate_guidance": "",
             "calibrate_size_scale": None},
    "v3": {"size_scale": "triangle=1.25,circle=0.85", "unconditional_extras": 1000, "calibrate_steps": 0,
           "calibrate_guidance": "", "calibrate_size_scale": None},
}
#: phase 3's optimiser: AdamW with this weight decay (phases 1 and 2: none)
CALIBRATE_WEIGHT_DECAY = 0.01


def canonical_factors(factors: dict) -> str:
    """One spelling per concept=number mapping (--size-scale, --calibrate-size-scale, --calibrate-guidance: concept
    order, shortest float, values of 1 left out, which mean "unchanged" for each): what --reuse compares."""
    return ",".join(f"{c}={float(factors[c])!r}" for c in data.CONCEPTS if c in factors and float(factors[c]) != 1.0)


def parse_guidance_fold(text: str) -> dict[str, float]:
    """--calibrate-guidance 'triangle=3,circle=3' -> {concept: w}: the concepts whose guided prediction at weight w
    phase 3 fits (micro_diffusion.train_eps's guidance_fold). Each name a concept, each w a number >= 1."""
    return data.parse_concept_factors(text, "calibrate guidance", "weight", "triangle=3", _fold_weight)


def _fold_weight(name: str, w: float) -> float:
    if not math.isfinite(w) or w < 1.0:
        raise ValueError(f"calibrate guidance {name}={w:g}: the weight must be a finite number >= 1 (1 = no "
                         f"folding), got {w}")
    return w


def world_size_scale(args) -> str:
    """The size scale of the world's own drawings (the detector's, the measurements'): phase 3's when there is one."""
    return args.calibrate_size_scale if args.calibrate_steps > 0 else args.size_scale


def _earlier_arg(prev: dict, k: str):
    """An argument of an earlier build from its manifest; one it does not record counts as off, except the size
    scale of a build made before the option existed, which world.size_scale reads (the micro-v3 branch's)."""
    if k == "size_scale" and k not in prev["args"]:
        return canonical_factors(world.size_scale(prev))
    return prev["args"].get(k, ARG_DEFAULTS_BEFORE.get(k))


def _load_record(prev_dir: Path, prev: dict, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(world.weight_path(name, prev_dir, prev)))  # checked against the manifest's sha256


def reuse_build(args, comfy_path, timer) -> Built:
    """Load the VAE, text encoder, detector and the two trained UNets of an earlier build (``--reuse DIR``, every
    file checked against its manifest's sha256) instead of training them again: only the variants, the measurements
    and the files are redone (and the detector with --retrain-detector). Refused unless the earlier build used the
    same arguments for those stages (the seeds are fixed in this script)."""
    prev_dir = Path(args.reuse)
    prev = world.load_manifest(prev_dir)
    no_phase3 = not _earlier_arg(prev, "calibrate_steps") and not args.calibrate_steps
    for k in REUSABLE_ARGS:
        if no_phase3 and k in CALIBRATE_ARGS:
            continue  # neither build has a phase 3: its settings mean nothing
        if _earlier_arg(prev, k) != getattr(args, k):
            hint = ("--reuse-phase2 to run phase 3 on its phase-2 UNets" if k in CALIBRATE_ARGS
                    and not _earlier_arg(prev, "calibrate_steps") else "rebuild from scratch")
            raise SystemExit(f"--reuse {prev_dir}: it was built with {k}={_earlier_arg(prev, k)!r}, this run has "
                             f"{getattr(args, k)!r}; {hint} instead")
    vae = make_vae(STAGE_SEEDS["vae"])
    vae.load_state_dict(_load_record(prev_dir, prev, "vae"))
    vae.eval()
    tok = text.tokenizer(Path(comfy_path) / "comfy" / "sd1_tokenizer")
    prefix = "cond_stage_model.transformer."
    clip = text.load_text_model({k[len(prefix):]: v for k, v in _load_record(prev_dir, prev, "clip").items()})
    ctx = text.encode(clip, tok, [data.caption(c) for c in data.CONCEPTS] + [""])
    unets = {}
    for name in ("original", "never_learned"):
        unet = make_unet(STAGE_SEEDS["unet"])
        unet.load_state_dict(_load_record(prev_dir, prev, name))
        unets[name] = unet.eval()
    recipe_ = prev["recipe"]
    logs = {"vae": {k: v for k, v in recipe_["vae"].items() if k not in ("steps", "batch", "lr", "loss")},
            "clip": {k: v for k, v in recipe_["text_encoder"].items() if k not in ("init", "pretraining")},
            "unet": {n: recipe_["unet"][n] for n in ("original", "never_learned")}}
    stages = ["vae", "clip", "unets"]
    timer.t0 = time.perf_counter()
    if args.retrain_detector or args.detector_from:
        det, det_log = detector_stage(args, vae)
        timer.done("detector")
    else:
        det = detector.from_state_dict(_load_record(prev_dir, prev, "detector"))
        det_log = dict(recipe_["detector"])
        stages.insert(2, "detector")
    reused = {"from": str(prev_dir), "stages": stages,
              "stage_seconds": {k: v for k, v in prev["build"]["stage_seconds"].items() if k in stages},
              "earlier_build_seconds": prev["build"]["seconds"]}
    logs["detector"] = det_log
    log(f"reused the {', '.join(stages)} of {prev_dir} (built in {prev['build']['seconds']} s)")
    return Built(vae, clip, ctx[:-1], ctx[-1], det, unets, logs, reused)


def unet_worker(args) -> int:
    """Train one UNet (``--unet-worker NAME``) from the inputs the main process saved in ``--work``: phase 1 (the
    first micro world's recipe: uniform batches, --unet-steps) unless its result came with the inputs (``init``:
    --reuse-phase1), then phase 2 (class-balanced batches, --finetune-steps, a fresh cosine schedule from
    --finetune-lr, a slower EMA) from phase 1's EMA weights unless that came with the inputs too (--reuse-phase2),
    then, with --calibrate-steps, phase 3 (the calibration: class-balanced batches of the world's own drawings, the
    guidance folded into --calibrate-guidance's concepts) from phase 2's EMA weights."""
    torch.set_num_threads(max(1, args.threads))
    boot_comfy()
    use_fast_attention()
    name = args.unet_worker
    inp = torch.load(Path(args.work) / f"{name}.in.pt")
    unet = make_unet(STAGE_SEEDS["unet"])

    def progress(step, total, loss):
        if step % 100 == 0 or step == total - 1:
            log(f"  {name} step {step}/{total}: loss {loss:.4f}")

    def snapshot(step, ema):
        # the EMA weights so far, for looking at a long run while it trains (--snapshots DIR; never shipped)
        sd = dict(unet.state_dict())
        names = [n for n, p in unet.named_parameters() if p.requires_grad]
        sd.update({n: s.clone() for n, s in zip(names, ema.shadow)})
        Path(args.snapshots).mkdir(parents=True, exist_ok=True)
        torch.save(sd, Path(args.snapshots) / f"{name}.{step}.pt")

    common = dict(min_snr_gamma=UNET_MIN_SNR, progress=progress, warmup=UNET_WARMUP, batch=args.unet_batch)
    logs = {}
    after = inp.get("after") or "phase1"  # the phase that produced ``init``
    if inp.get("init") is not None:
        unet.load_state_dict(inp["init"])
        logs["phase1"] = f"reused (--reuse-{after})"
        if after == "phase2":
            logs["phase2"] = "reused (--reuse-phase2)"
    else:
        tl = diffusion.train_eps(unet, inp["z"], inp["labels"], inp["contexts"], inp["uncond"], steps=args.unet_steps,
                                 lr=args.unet_lr, seed=STAGE_SEEDS["unet"], ema_decay=UNET_EMA, **common)
        logs["phase1"] = {"loss": tl.summary(4), "seconds": round(tl.seconds, 1)}
    if after != "phase2" and args.finetune_steps > 0 and name in args.finetune_models.split(","):
        tl = diffusion.train_eps(unet, inp["z"], inp["labels"], inp["contexts"], inp["uncond"],
                                 steps=args.finetune_steps, lr=args.finetune_lr, seed=STAGE_SEEDS["finetune"],
                                 ema_decay=FINETUNE_EMA, balanced=True, snapshot=snapshot if args.snapshots else None,
                                 snapshot_every=500, **common)
        logs["phase2"] = {"loss": tl.summary(4), "seconds": round(tl.seconds, 1)}
    if args.calibrate_steps > 0:
        fold = parse_guidance_fold(args.calibrate_guidance)
        weights = torch.tensor([fold.get(c, 1.0) for c in data.CONCEPTS]
                               + [1.0] * (inp["contexts"].shape[0] - len(data.CONCEPTS)))
        tl = diffusion.train_eps(unet, inp["z3"], inp["labels3"], inp["contexts"], inp["uncond"],
                                 steps=args.calibrate_steps, lr=args.calibrate_lr, seed=STAGE_SEEDS["calibrate"],
                                 ema_decay=FINETUNE_EMA, balanced=True, weight_decay=CALIBRATE_WEIGHT_DECAY,
                                 guidance_fold=weights, **common)
        logs["phase3"] = {"loss": tl.summary(4), "seconds": round(tl.seconds, 1)}
    torch.save({"state_dict": unet.state_dict(), "log": logs}, Path(args.work) / f"{name}.out.pt")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=world.WEIGHTS_DIR, help="output folder (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads of the main process (default 2)")
    ap.add_argument("--images-per-concept", type=int, default=1000)
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--unet-steps", type=int, default=3000, help="UNet phase 1 updates (uniform batches)")
    ap.add_argument("--unet-batch", type=int, default=64)
    ap.add_argument("--unet-lr", type=float, default=2e-3)
    ap.add_argument("--finetune-steps", type=int, default=2000, help="UNet phase 2 updates (class-balanced batches)")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--world", default="calibrated", choices=list(WORLD_PRESETS),
                    help="which micro world to build (default: calibrated, the shipped one; v2.1: the one before it, "
                         "without phase 3; v3: the candidate with near-shapes): sets --size-scale, "
                         "--unconditional-extras and the --calibrate-* options, each of which, given, overrides it")
    ap.add_argument("--size-scale", default=None, metavar="C=F,...",
                    help="per-concept factors on the drawn radius, e.g. triangle=1.25,circle=0.85 (the v3 candidate "
                         "of docs/micro-world.md); default: none (the shipped world)")
    ap.add_argument("--unconditional-extras", type=int, default=None, metavar="N",
                    help="near-shapes (ellipses, capsules, beans, cut circles, three-pointed stars) the UNets also "
                         "learn with the empty prompt (memora_build.micro_detector.unconditional_extras; the v3 "
                         "candidate used 1000); default 0 (the shipped world)")
    ap.add_argument("--calibrate-steps", type=int, default=None, metavar="N",
                    help="UNet phase 3 updates (the calibration: class-balanced batches of the world's own drawings, "
                         "--calibrate-size-scale, with the guidance of --calibrate-guidance's concepts folded into "
                         "the weights; docs/micro-world.md); default 0: no phase 3 (the shipped world)")
    ap.add_argument("--calibrate-lr", type=float, default=3e-4, help="phase 3's peak learning rate (cosine)")
    ap.add_argument("--calibrate-guidance", default=None, metavar="C=W,...",
                    help="phase 3 fits these concepts' guided prediction at weight W (e.g. triangle=3,circle=3: "
                         "cfg 7.5 then draws them as cfg 2.5 would)")
    ap.add_argument("--calibrate-size-scale", default=None, metavar="C=F,...",
                    help="the size scale of phase 3's drawings and of everything after it (the detector, the "
                         "measurements): the world's shapes; the VAE and phases 1-2 keep --size-scale's (default: "
                         "--size-scale's; 'none': no scaling)")
    ap.add_argument("--finetune-models", default="original,never_learned",
                    help="the UNets that get phase 2 (comma-separated; the others stay at phase 1)")
    ap.add_argument("--detector-from", type=Path, default=None, metavar="FILE",
                    help="take the detector from this safetensors file instead of training it (recorded with its "
                         "sha256 in the manifest)")
    ap.add_argument("--reuse-shared", type=Path, default=None, metavar="DIR",
                    help="take the VAE, text encoder and detector from this earlier build (same data and VAE "
                         "arguments) and train the UNets and the rest")
    ap.add_argument("--reuse-phase1", type=Path, default=None, metavar="DIR",
                    help="take the VAE, text encoder and phase-1 UNets from this earlier build (same arguments) and "
                         "train the detector, phase 2 and the rest")
    ap.add_argument("--reuse-phase2", type=Path, default=None, metavar="DIR",
                    help="take the VAE, text encoder and phase-2 UNets from this earlier build (same arguments, no "
                         "phase 3) and train phase 3, the detector and the rest")
    ap.add_argument("--detector-eval-images", type=int, default=500,
                    help="held-out procedural images per class for the detector's accuracy table")
    ap.add_argument("--eval-images", type=int, default=128, help="images per concept and model for the measurements")
    ap.add_argument("--eval-steps", type=int, default=50)
    ap.add_argument("--eval-cfg", type=float, default=7.5)
    ap.add_argument("--erase", default=world.ERASED_CONCEPT, choices=list(data.CONCEPTS),
                    help="the concept the never-learned model never sees")
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="change one setting of a variant's recipe (memora_build/micro_erasure.py VARIANT_RECIPES), "
                         "e.g. esd_u.steps=120; repeatable")
    ap.add_argument("--measure-only", action="store_true",
                    help="with --reuse: take the variants' files too, and redo only the measurements and the files")
    ap.add_argument("--variants", default=None, metavar="NAME,...",
                    help="with --reuse: make only these variants again (e.g. esd_x,esd_x_long); the others' files come "
                         "from the --reuse build (sha256-checked); every model is measured again")
    ap.add_argument("--retrain-detector", action="store_true",
                    help="with --reuse: train the detector again instead of reusing the earlier build's")
    ap.add_argument("--jobs", type=int, default=2,
                    help="worker processes: the original and never-learned UNets in parallel, the variants and the "
                         "measurements shared out over this many (default 2; 1 = in turn, in this process)")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="take the VAE, text encoder, detector and trained UNets from this earlier build (same "
                         "arguments required) and redo only the variants, the measurements and the files")
    ap.add_argument("--snapshots", type=Path, default=None,
                    help="also save the UNets' EMA weights every 1,000 updates here (to watch a long run)")
    ap.add_argument("--tables", type=Path, default=None, metavar="DIR",
                    help="print the markdown tables of docs/micro-world.md from DIR's manifest, and exit")
    ap.add_argument("--unet-worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    preset = WORLD_PRESETS[args.world]
    given = {k for k in preset if getattr(args, k) is not None}  # the options the command line gave
    for k in ("size_scale", "unconditional_extras", "calibrate_steps"):
        if k not in given:
            setattr(args, k, preset[k])
    try:
        args.size_scale = canonical_factors(data.parse_size_scale(args.size_scale))
    except ValueError as exc:
        ap.error(f"--size-scale: {exc}")
    phase3 = args.calibrate_steps > 0
    if "calibrate_guidance" not in given:
        args.calibrate_guidance = preset["calibrate_guidance"] if phase3 else ""
    if "calibrate_size_scale" not in given:
        # phase 3 draws at the preset's scale, or at --size-scale's where that was given or the preset has none
        own = preset["calibrate_size_scale"] if "size_scale" not in given else None
        args.calibrate_size_scale = ("" if not phase3 else own if own is not None else args.size_scale)
    elif args.calibrate_size_scale.strip().lower() == "none":
        args.calibrate_size_scale = ""
    try:
        args.calibrate_size_scale = canonical_factors(data.parse_size_scale(args.calibrate_size_scale))
    except ValueError as exc:
        ap.error(f"--calibrate-size-scale: {exc}")
    try:
        args.calibrate_guidance = canonical_factors(parse_guidance_fold(args.calibrate_guidance))
    except ValueError as exc:
        ap.error(f"--calibrate-guidance: {exc}")
    if args.calibrate_steps < 0:
        ap.error(f"--calibrate-steps: expected 0 or more updates, got {args.calibrate_steps}")
    if args.calibrate_steps == 0 and (args.calibrate_guidance or "calibrate_size_scale" in given):
        ap.error("--calibrate-guidance and --calibrate-size-scale shape phase 3: give --calibrate-steps N too")
    if not (args.calibrate_lr > 0 and math.isfinite(args.calibrate_lr)):
        ap.error(f"--calibrate-lr: expected a positive learning rate, got {args.calibrate_lr}")
    if args.reuse_phase2 is not None and args.calibrate_steps == 0:
        ap.error("--reuse-phase2 starts phase 3 from an earlier build's phase-2 UNets: give --calibrate-steps N too")
    if sum(x is not None for x in (args.reuse, args.reuse_phase1, args.reuse_phase2, args.reuse_shared)) > 1:
        ap.error("--reuse, --reuse-phase1, --reuse-phase2 and --reuse-shared exclude each other: give one")
    if args.unconditional_extras < 0:
        ap.error(f"--unconditional-extras: expected 0 or more images, got {args.unconditional_extras}")
    return args


class Timer:
    """Wall seconds per stage (``stage_seconds`` in the manifest)."""

    def __init__(self):
        self.seconds: dict = {}
        self.t0 = time.perf_counter()

    def done(self, name: str):
        self.seconds[name] = round(time.perf_counter() - self.t0, 1)
        log(f"{name}: {self.seconds[name]} s")
        self.t0 = time.perf_counter()


def make_data(args):
    """Stage 1: the training images of the five concepts (labels index data.CONCEPTS), the ``none`` images (for the
    VAE) and the near-shapes the UNets learn with the empty prompt (``--unconditional-extras``, in -1..1)."""
    imgs, labels = data.make_dataset(args.images_per_concept, STAGE_SEEDS["data"], data.CONCEPTS)
    none_imgs, _ = data.make_dataset(args.images_per_concept // 4, STAGE_SEEDS["data"], (data.NONE,))
    extras = micro_detector.unconditional_extras(args.unconditional_extras, STAGE_SEEDS["extras"])
    return data.to_tensor_range(imgs), labels, none_imgs, data.to_tensor_range(extras)


def vae_stage(args, x_all: torch.Tensor, none_imgs):
    """Stage 2: train the VAE, re-express its latent space (standardised), and measure it on held-out images.
    Returns the VAE, the training images' latent means and the stage's log."""
    vae = make_vae(STAGE_SEEDS["vae"])
    vae_x = torch.cat([x_all, data.to_tensor_range(none_imgs)])
    vae_log = train_vae(vae, vae_x, steps=args.vae_steps, batch=16, lr=2e-3, kl_weight=VAE_KL, seed=STAGE_SEEDS["vae"],
                        lowfreq_weight=VAE_LOWFREQ)
    z = encode_means(vae, x_all)
    standardize_latents(vae, z.mean((0, 2, 3)), z.std((0, 2, 3)))
    z_raw_stats = {"mean": z.mean((0, 2, 3)).tolist(), "std": z.std((0, 2, 3)).tolist()}
    z = encode_means(vae, x_all)
    held_imgs, _ = data.make_dataset(40, 100 + STAGE_SEEDS["data"], data.CONCEPTS)
    held = data.to_tensor_range(held_imgs)
    rec = decode(vae, encode_means(vae, held))
    vae_log.update({"raw_latent_channel_stats": z_raw_stats,
                    "latent_std_x_0.18215": float(z.std()) * diffusion.LATENT_SCALE,
                    "held_out_mse_-1..1": float((rec - held).pow(2).mean())})
    return vae, z, vae_log


def text_stage(comfy_path):
    """Stage 3: the seeded text encoder, pretrained to give each prompt its own direction; the prompts' embeddings
    (the five captions, then the empty prompt)."""
    tok = text.tokenizer(Path(comfy_path) / "comfy" / "sd1_tokenizer")
    clip = micro_text.make_text_model(STAGE_SEEDS["clip"])
    prompts = [data.caption(c) for c in data.CONCEPTS]
    clip_log = micro_text.pretrain(clip, tok, prompts + [""], seed=STAGE_SEEDS["clip"])
    log(f"text encoder: prompts now differ by {clip_log['relative_difference_to_first_prompt']} (relative)")
    ctx = text.encode(clip, tok, prompts + [""])
    return clip, ctx, clip_log


def detector_stage(args, vae):
    """Stage 4: the concept detector (memora_build.micro_detector: drawn images, hard negatives and VAE round trips),
    and its accuracy table and confusion matrix on held-out procedural images (drawn and round trips)."""
    det_log: dict = {}
    if args.detector_from:
        from safetensors.torch import load_file

        sd = load_file(str(args.detector_from))
        det_log.update({"from": str(args.detector_from), "sha256": world.sha256_file(Path(args.detector_from)),
                        "made_by": f"memora_build.micro_detector.train_detector(vae, {STAGE_SEEDS['detector']}, "
                                   f"steps={DETECTOR_STEPS}) on this VAE (the call a full build makes), run by the "
                                   f"detector's author; not retrained by this build"})
    else:
        sd = micro_detector.train_detector(
            vae, STAGE_SEEDS["detector"], steps=DETECTOR_STEPS, log=det_log,
            progress=lambda s, t, loss: (s % 400 == 0) and log(f"  detector step {s}/{t}: loss {loss:.4f}"))
    det = detector.from_state_dict(sd)
    det_log["evaluation"] = micro_detector.evaluate_detector(det, images_per_class=args.detector_eval_images,
                                                             vae=vae)
    per = det_log["evaluation"]["per_class"]
    log("detector held-out accuracy per class: " + ", ".join(f"{c} {v:.3f}" for c, v in per.items()))
    return det, det_log


def unets_stage(args, z: torch.Tensor, labels, contexts: torch.Tensor, uncond: torch.Tensor, meanwhile=None,
                phase1: dict | None = None, z_extra: torch.Tensor | None = None, calibration: tuple | None = None,
                after: str = "phase1"):
    """Stage 5: the original UNet (every concept) and the never-learned one (all but the erased concept), trained in
    worker processes (``--unet-worker``), in parallel with --jobs 2 (one thread each). With --unconditional-extras both also learn ``z_extra``
    (the near-shapes' latents) with the empty prompt: they get the label after the concepts', whose context is the
    empty prompt's (in class-balanced batches they are one more class). ``calibration``: (latents, labels) of phase
    3's drawings (--calibrate-steps). ``phase1``: the UNets' starting weights per name, the result of ``after``
    (phase1 or phase2) of an earlier build. ``meanwhile()`` (the detector stage) runs in this process while they
    train; its result is returned too."""
    lab = torch.from_numpy(labels)
    jobs = {"original": torch.ones_like(lab, dtype=torch.bool), "never_learned": lab != data.CONCEPTS.index(args.erase)}
    n_extra = 0 if z_extra is None else int(z_extra.shape[0])
    train_contexts = torch.cat([contexts, uncond[None]]) if n_extra else contexts
    extra_labels = torch.full((n_extra,), len(data.CONCEPTS), dtype=lab.dtype)
    unets, unet_logs = {}, {}
    with tempfile.TemporaryDirectory(prefix="memora-micro-build-") as work:
        procs = {}
        for name, keep in jobs.items():
            zs, ls = z[keep], lab[keep]
            if n_extra:
                zs, ls = torch.cat([zs, z_extra]), torch.cat([ls, extra_labels])
            inputs = {"z": zs.clone(), "labels": ls.clone(), "contexts": train_contexts, "uncond": uncond,
                      "init": (phase1 or {}).get(name), "after": after}
            if calibration is not None:
                z3, lab3 = calibration[0], torch.as_tensor(calibration[1])
                keep3 = lab3 != data.CONCEPTS.index(args.erase) if name == "never_learned" else torch.ones_like(
                    lab3, dtype=torch.bool)
                z3s, l3s = z3[keep3], lab3[keep3]
                if n_extra:
                    z3s, l3s = torch.cat([z3s, z_extra]), torch.cat([l3s, extra_labels])
                inputs.update(z3=z3s.clone(), labels3=l3s.clone())
            torch.save(inputs, Path(work) / f"{name}.in.pt")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--unet-worker", name, "--work", work,
                   "--unet-steps", str(args.unet_steps), "--unet-batch", str(args.unet_batch),
                   "--unet-lr", str(args.unet_lr), "--threads", "1" if args.jobs > 1 else str(args.threads),
                   "--finetune-steps", str(args.finetune_steps), "--finetune-lr", str(args.finetune_lr),
                   "--finetune-models", args.finetune_models, "--calibrate-steps", str(args.calibrate_steps),
                   "--calibrate-lr", str(args.calibrate_lr)]
            if args.calibrate_steps > 0:
                cmd += ["--calibrate-guidance", args.calibrate_guidance,
                        "--calibrate-size-scale", args.calibrate_size_scale or "none"]
            if args.snapshots:
                cmd += ["--snapshots", str(args.snapshots)]
            procs[name] = subprocess.Popen(cmd)
            if args.jobs <= 1:
                procs[name].wait()
        side = meanwhile() if meanwhile is not None else None
        for name, proc in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"UNet training for {name!r} failed (exit code {proc.returncode})")
            out = torch.load(Path(work) / f"{name}.out.pt")
            unet = make_unet(STAGE_SEEDS["unet"])
            unet.load_state_dict(out["state_dict"])
            unet.eval()
            unets[name] = unet
            unet_logs[name] = {"images": int(jobs[name].sum()), **({"unconditional_extras": n_extra} if n_extra else {}),
                               **out["log"]}
    return unets, unet_logs, side


def phase1_from(args, comfy_path, x_all):
    """--reuse-phase1 DIR (or --reuse-phase2 DIR, --reuse-shared DIR): the VAE, text encoder and phase-1 (phase-2;
    no) UNets of an earlier build made with the same arguments for those stages (every file checked against its
    manifest's sha256)."""
    shared_only = args.reuse_shared is not None
    mode = "shared" if shared_only else ("phase2" if args.reuse_phase2 is not None else "phase1")
    prev_dir = Path({"shared": args.reuse_shared, "phase1": args.reuse_phase1, "phase2": args.reuse_phase2}[mode])
    flag = f"--reuse-{mode}"
    prev = world.load_manifest(prev_dir)
    for k in {"shared": SHARED_ARGS, "phase1": PHASE1_ARGS, "phase2": PHASE2_ARGS}[mode]:
        if _earlier_arg(prev, k) != getattr(args, k):
            raise SystemExit(f"{flag} {prev_dir}: it was built with {k}={_earlier_arg(prev, k)!r}, this run "
                             f"has {getattr(args, k)!r}")
    if mode == "phase1" and (prev["args"].get("finetune_steps", 0) or _earlier_arg(prev, "calibrate_steps")):
        raise SystemExit(f"--reuse-phase1 {prev_dir}: its UNets already had phase 2 or 3; give a build without them")
    if mode == "shared" and not args.detector_from:
        prev_world = canonical_factors(world.size_scale(prev))
        if prev_world != world_size_scale(args):
            raise SystemExit(f"--reuse-shared {prev_dir}: its detector learned shapes drawn at size scale "
                             f"{prev_world!r}, this world's are drawn at {world_size_scale(args)!r}; give "
                             f"--detector-from FILE, or --reuse-phase1 to train the detector again")
    if mode == "phase2" and _earlier_arg(prev, "calibrate_steps"):
        raise SystemExit(f"--reuse-phase2 {prev_dir}: its UNets already had phase 3; give a build without it")
    vae = make_vae(STAGE_SEEDS["vae"])
    vae.load_state_dict(_load_record(prev_dir, prev, "vae"))
    vae.eval()
    tok = text.tokenizer(Path(comfy_path) / "comfy" / "sd1_tokenizer")
    prefix = "cond_stage_model.transformer."
    clip = text.load_text_model({k[len(prefix):]: v for k, v in _load_record(prev_dir, prev, "clip").items()})
    ctx = text.encode(clip, tok, [data.caption(c) for c in data.CONCEPTS] + [""])
    phase1 = {} if shared_only else {name: _load_record(prev_dir, prev, name) for name in ("original", "never_learned")}
    if shared_only and not args.detector_from:
        args.detector_from = world.weight_path("detector", prev_dir, prev)  # sha256-checked like the others
    recipe_ = prev["recipe"]
    logs = {"vae": {k: v for k, v in recipe_["vae"].items() if k not in ("steps", "batch", "lr", "loss")},
            "clip": {k: v for k, v in recipe_["text_encoder"].items() if k not in ("init", "pretraining")},
            ("shared_from" if shared_only else mode): {"from": str(prev_dir), "stage_seconds": prev["build"].get("stage_seconds"),
                       "unet": {n: recipe_["unet"].get(n) for n in ("original", "never_learned")}}}
    log(f"{'VAE, text encoder, detector' if shared_only else mode.replace('phase', 'phase ') + ' (VAE, text encoder, UNets)'}"
        f" from {prev_dir}")
    return vae, encode_means(vae, x_all), clip, ctx, phase1, logs, mode


def train_stages(args, comfy_path, x_all, labels, none_imgs, extras, timer: Timer, calibration=None) -> Built:
    """Stages 2-5: VAE, text encoder (or, with --reuse-phase1/2, those and the phase-1/2 UNets of an earlier build),
    then the two UNets in worker processes while this one trains the detector (its seconds are recorded separately:
    'unets' is the wall time of the two stages together). ``calibration``: phase 3's images and labels (drawn at
    --calibrate-size-scale). From the UNet stage on, every drawing uses the world's size scale."""
    phase1, after = None, "phase1"
    if args.reuse_phase1 or args.reuse_phase2 or args.reuse_shared:
        vae, z, clip, ctx, phase1, p1_logs, after = phase1_from(args, comfy_path, x_all)
        vae_log, clip_log = p1_logs["vae"], p1_logs["clip"]
        timer.done(f"{'shared' if after == 'phase1' and args.reuse_shared else after} reused")
    else:
        vae, z, vae_log = vae_stage(args, x_all, none_imgs)
        timer.done("vae")
        clip, ctx, clip_log = text_stage(comfy_path)
        timer.done("clip")
        p1_logs = None
    contexts, uncond = ctx[:-1], ctx[-1]
    data.set_size_scale(data.parse_size_scale(world_size_scale(args)))  # the detector learns the world's shapes
    t_det = {}

    def detector_meanwhile():
        t0 = time.perf_counter()
        out = detector_stage(args, vae)
        t_det["seconds"] = round(time.perf_counter() - t0, 1)
        return out

    z_extra = encode_means(vae, extras) if len(extras) else None
    z3 = None if calibration is None else (encode_means(vae, calibration[0]), calibration[1])
    unets, unet_logs, (det, det_log) = unets_stage(args, z, labels, contexts, uncond, meanwhile=detector_meanwhile,
                                                   phase1=phase1, z_extra=z_extra, calibration=z3, after=after)
    timer.done("unets")
    timer.seconds["detector (during unets)"] = t_det["seconds"]
    for key in ("phase1", "phase2"):
        if p1_logs and key in p1_logs:
            unet_logs[f"{key}_reused"] = p1_logs[key]
    if p1_logs and "shared_from" in p1_logs:
        unet_logs["shared_reused"] = p1_logs["shared_from"]
    return Built(vae, clip, contexts, uncond, det, unets,
                 {"vae": vae_log, "clip": clip_log, "detector": det_log, "unet": unet_logs})


def check_variant_names(text) -> tuple[str, ...]:
    """--variants NAME,...: names of variants of the original (memora_build.micro_erasure.VARIANT_RECIPES)."""
    if not text:
        return ()
    names = tuple(n.strip() for n in str(text).split(",") if n.strip())
    unknown = [n for n in names if n not in erasure.VARIANT_RECIPES]
    if unknown or not names:
        raise SystemExit(f"--variants {text!r}: {', '.join(unknown) or 'no name'} is not a variant of the original; "
                         f"expected names from {', '.join(erasure.VARIANT_RECIPES)}")
    return names


_VARIANTS: dict = {}  # what _make_variant reads (set before the workers are forked)


def _make_variant(name: str):
    """One variant of the original (in a forked worker with --jobs > 1, else in this process): (name, the tensors its method changed, its
    log, its seconds)."""
    built, rec = _VARIANTS["built"], _VARIANTS["recipes"][name]
    if _VARIANTS["threads"]:
        torch.set_num_threads(_VARIANTS["threads"])
    t0 = time.perf_counter()
    idx = [data.CONCEPTS.index(c) for c in rec["erase"]]
    unet = copy.deepcopy(built.unets["original"])
    if rec["method"] == "uce":
        tokens = erasure.uce_token_sets(built.contexts, built.uncond, idx, rec["guide"])
        stored, vlog = erasure.uce_edit(unet.state_dict(), tokens["erase"], tokens["guide"], tokens["preserve"],
                                        lam=rec["lam"], preserve_weight=rec["preserve_weight"])
        vlog["first_position"] = tokens["first_position"]
    else:
        others = torch.stack([built.contexts[i] for i in range(len(data.CONCEPTS)) if i not in idx])
        tl = diffusion.esd_train(
            unet, built.contexts[idx], built.uncond, method=rec["train"], steps=rec["steps"], batch=32,
            lr=rec["lr"], seed=rec["seed"], negative_guidance=rec["negative_guidance"],
            preserve_ctx=others if rec["preserve_weight"] > 0 else None, preserve_weight=rec["preserve_weight"],
            progress=lambda s, t, loss: (s % 100 == 0) and log(f"  {name} step {s}/{t}: loss {loss:.5f}"))
        stored = erasure.partial_state(unet, diffusion.trainable_for_esd(unet, rec["train"]))
        vlog = {"loss": tl.summary(2), "sample_steps": 20, "sample_cfg": 3.0, "batch": 32}
    stored = {k: v.detach().clone().contiguous() for k, v in stored.items()}
    return name, stored, vlog, round(time.perf_counter() - t0, 1)


def _variant_recipes(args, only: tuple = ()) -> tuple[dict, list]:
    """(every variant's recipe with --recipe's overrides, the names to make: all, or the ``only`` ones)."""
    recipes = erasure.override(erasure.VARIANT_RECIPES, args.recipe)
    return recipes, [n for n in recipes if not only or n in only]


def variants_stage(args, built: Built, timer: Timer, only: tuple = ()):
    """Stage 6 in this process, one variant after the other (--jobs 1; with more, ``variants_and_measure`` makes
    them in worker processes): each variant of the original (memora_build.micro_erasure.VARIANT_RECIPES): ESD-x (two
    lengths), ESD-u, UCE, the deep ESD-u and the two-concept ESD-x, or only the ``only`` ones; kept in
    ``built.variants`` as the tensors the method changed, each variant's own seconds recorded."""
    recipes, names = _variant_recipes(args, only)
    _VARIANTS.update(built=built, recipes=recipes, threads=0)  # this process's thread count
    for name in names:
        _install_variant(built, timer, recipes[name], _make_variant(name))
    timer.done("variants (wall)")


def _original_with(built: Built, stored: dict) -> torch.nn.Module:
    """A copy of the original UNet with ``stored`` (a variant's changed tensors) put over it, in eval mode."""
    unet = copy.deepcopy(built.unets["original"])
    unet.load_state_dict({**unet.state_dict(), **stored})
    return unet.eval()


def _longest_first(names, recipes) -> list:
    """The variants in the order to start them: the most work first (an ESD-u update costs about 6 ESD-x ones)."""
    return sorted(names, key=lambda n: -recipes[n].get("steps", 0) * (6 if recipes[n].get("train") == "u" else 1))


def _install_variant(built: Built, timer: Timer, rec: dict, made: tuple):
    """Put one made variant (``_make_variant``'s result) into ``built``: its UNet and its record."""
    name, stored, vlog, seconds = made
    built.unets[name] = _original_with(built, stored)
    built.variants[name] = (stored, {"recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in rec.items()},
                                     "paper": erasure.PAPERS[rec["method"]], **vlog})
    timer.seconds[name] = seconds


def variants_and_measure(args, built: Built, timer: Timer, only: tuple = ()) -> dict:
    """Stages 6 and 7 together (with --jobs > 1): the variants and the measurements share one pool of forked
    one-thread workers, the measurements cut into one job per model and concept, so the models that are ready (the
    original, the never-learned model, reused variants, each variant as soon as it is made) are measured while the
    longest variant (the deep ESD-u) still trains, and the last jobs are short. The same numbers as the two stages
    one after the other with --jobs > 1: every variant is trained and every model sampled on one thread, each seeded
    on its own. Returns ``measure``'s result."""
    recipes, names = _variant_recipes(args, only)
    if args.jobs <= 1 or not names:
        variants_stage(args, built, timer, only=only)
        results = measure(args, built)
        timer.done("evaluation")
        return results
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    _VARIANTS.update(built=built, recipes=recipes, threads=1)
    _MEASURE.update(args=args, built=built, judge=_judge_module())
    made, parts = {}, {}
    kind, name, concept = "job", "?", None
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("fork")) as ex:
        pending = {ex.submit(_make_variant, n): ("variant", n, None) for n in _longest_first(names, recipes)}
        for n in world.VARIANTS:
            if n in built.unets and n not in names:
                pending.update({ex.submit(_measure_part, n, c): ("measure", n, c) for c in data.CONCEPTS})
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    kind, name, concept = pending.pop(fut)
                    if kind == "variant":
                        made[name] = fut.result()
                        pending.update({ex.submit(_measure_part, name, c, made[name][1]): ("measure", name, c)
                                        for c in data.CONCEPTS})
                        if len(made) == len(names):
                            for n in names:  # in the recipes' order, whatever order they were made in
                                _install_variant(built, timer, recipes[n], made[n])
                            timer.done("variants (wall)")
                    else:
                        parts[(name, concept)] = fut.result()
                        if all((name, c) in parts for c in data.CONCEPTS):
                            _log_rates(name, _merge_parts(name, parts), args.eval_images)
        except BaseException as exc:
            what = f"{kind} {name}" + (f" ({concept})" if concept else "")
            log(f"{what} failed ({type(exc).__name__}: {exc}); cancelling the queued jobs and waiting for the "
                f"running ones to stop")
            ex.shutdown(wait=True, cancel_futures=True)
            raise
    # what is left after the last variant is made: the measurements that could not overlap with it
    timer.done("evaluation")
    return {name: _merge_parts(name, parts) for name in world.VARIANTS}


def reuse_variants(args, built: Built, timer: Timer, skip: tuple = ()):
    """--measure-only (and --variants, for the variants not named): the variants' files of the --reuse build
    (sha256-checked) instead of making them again."""
    from safetensors.torch import load_file

    prev_dir = Path(args.reuse)
    prev = world.load_manifest(prev_dir)
    reused = {n: v for n, v in prev["recipe"]["variants"].items() if n not in skip}
    missing = [n for n in erasure.VARIANT_RECIPES if n not in reused and n not in skip]
    if missing:
        raise SystemExit(f"--reuse {prev_dir}: it has no variant {', '.join(missing)}; name it in --variants")
    for name, vlog in reused.items():
        stored = load_file(str(world.weight_path(name, prev_dir, prev)))
        built.unets[name] = _original_with(built, stored)
        built.variants[name] = (stored, vlog)
    timer.seconds.update({k: v for k, v in prev["build"]["stage_seconds"].items() if k in reused})
    built.reused["stages"] += list(reused)
    log(f"reused the variants of {prev_dir}: {', '.join(reused)}")


_MEASURE: dict = {}  # what the forked measurement workers read (set before forking)


def _measure_part(name: str, concept: str, stored: dict | None = None):
    """One model's measurement of one concept (in a forked worker, or in this process with --jobs 1): ``name``'s
    UNet, or with ``stored`` the original's with those tensors put over it (a variant made after the worker was
    forked)."""
    args, built, judge = _MEASURE["args"], _MEASURE["built"], _MEASURE["judge"]
    torch.set_num_threads(1)
    unet = built.unets[name] if stored is None else _original_with(built, stored)
    return evaluate(unet, built.vae, built.det, built.contexts, built.uncond, n=args.eval_images,
                    seed=1000 * STAGE_SEEDS["eval"], cfg=args.eval_cfg, steps=args.eval_steps,
                    judge=judge.judge_batch if judge else None, concepts=(concept,))


def _merge_parts(name: str, parts: dict) -> dict:
    """``evaluate``'s result for model ``name`` from its per-concept parts (keys (name, concept))."""
    per = [parts[(name, c)] for c in data.CONCEPTS]
    return {"counts": {c: p["counts"][c] for c, p in zip(data.CONCEPTS, per)}, "n": per[0]["n"],
            "samples": {c: p["samples"][c] for c, p in zip(data.CONCEPTS, per)},
            "labels": {c: p["labels"][c] for c, p in zip(data.CONCEPTS, per)}}


def _log_rates(name: str, result: dict, n: int):
    log(f"  {name}: " + ", ".join(f"{c} {k / n:.2f}" for c, k in result["counts"].items()))


def _measure_star(job):
    return job, _measure_part(*job)


def measure(args, built: Built):
    """Stage 7: every model's detection counts per concept (with the judge's labels when memora.micro.judge is
    there) and the contact sheet's samples, one job per model and concept; with --jobs > 1 the jobs are shared out
    over forked worker processes of one thread each (the same numbers as one process: each concept's sampling is
    seeded on its own)."""
    _MEASURE.update(args=args, built=built, judge=_judge_module())
    names = list(world.VARIANTS)
    jobs = [(n, c) for n in names for c in data.CONCEPTS]
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("fork")) as ex:
            parts = dict(ex.map(_measure_star, jobs))
    else:
        parts = dict(map(_measure_star, jobs))
    results = {name: _merge_parts(name, parts) for name in names}
    for name in names:
        _log_rates(name, results[name], args.eval_images)
    return results


def _judge_module():
    try:
        from memora.micro import judge
    except ImportError:
        return None
    return judge


def rate_table(results: dict) -> dict:
    """Per model and concept the rate record (Wilson interval) of the detector's calls."""
    return {name: {c: rate_record(k, r["n"], CONVENTION) for c, k in r["counts"].items()}
            for name, r in results.items()}


def targets(results: dict) -> dict:
    """Per variant: the erased concepts' rates (target <= 0.10) and each kept concept's rate over the original's
    (target >= 0.80), and whether both hold."""
    orig = results["original"]["counts"]
    out = {}
    for name in world.VARIANTS:
        if name == "original":
            continue
        r = results[name]
        erased = world.ERASED[name]
        er = {c: r["counts"][c] / r["n"] for c in erased}
        kept = {c: (round(r["counts"][c] / orig[c], 3) if orig[c] else None) for c in data.CONCEPTS if c not in erased}
        out[name] = {"erased_rates": er, "kept_over_original": kept,
                     "met": all(v <= 0.10 for v in er.values()) and all(v is not None and v >= 0.80
                                                                        for v in kept.values())}
    return out


def agreement(results: dict) -> dict | None:
    """The detector's and the judge's labels on the generated images: share of images they agree on, per model."""
    if not all("judge" in e for r in results.values() for e in r["labels"].values()):
        return None
    out = {}
    for name, r in results.items():
        pairs = [(d, j) for e in r["labels"].values() for d, j in zip(e["detector"], e["judge"])]
        out[name] = rate_record(sum(d == j for d, j in pairs), len(pairs), "detector and judge agree")
    return out


def contact_sheet(results: dict):
    """One block per model (its name, then a row of 8 images per concept, circle to cross)."""
    from PIL import Image, ImageDraw

    scale, cell, label_h = 2, data.IMAGE_SIZE * 2, 14
    cols, rows = 8, len(data.CONCEPTS)
    block_h = label_h + rows * cell
    sheet = Image.new("RGB", (cols * cell + 70, len(results) * block_h), "white")
    draw = ImageDraw.Draw(sheet)
    for bi, (name, r) in enumerate(results.items()):
        y0 = bi * block_h
        draw.text((2, y0 + 1), name, fill="black")
        for ri, c in enumerate(data.CONCEPTS):
            draw.text((cols * cell + 4, y0 + label_h + ri * cell + cell // 2 - 5), c, fill="black")
            for ci, img in enumerate(r["samples"][c][:cols]):
                tile = Image.fromarray(img).resize((cell, cell), Image.NEAREST)
                sheet.paste(tile, (ci * cell, y0 + label_h + ri * cell))
    del scale
    return sheet


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+uncommitted changes" if dirty else "")


def save_networks(args, out: Path, built: Built, sheet) -> dict:
    """Stage 8a: the safetensors files (float32, keys sorted; a variant of the original stores only what its method
    changed) and samples.png; returns each file's record for the manifest."""
    meta = {"format": "memora micro world", "build": "scripts/build_micro_world.py"}
    by = {"script": "scripts/build_micro_world.py", "commit": git_commit(),
          "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("out", "unet_worker", "work", "snapshots")}}
    base_seeds = {k: STAGE_SEEDS[k] for k in ("data", "vae", "clip")}

    def save(name: str, tensors: dict, metadata: dict) -> dict:
        prev = Path(args.reuse) / world.FILES[name] if args.reuse else None
        return save_safetensors(tensors, out / world.FILES[name], metadata, previous=prev)

    files = {
        "clip": save("clip", {"cond_stage_model.transformer." + k: v for k, v in built.clip.state_dict().items()
                              if "position_ids" not in k}, meta) | {"seeds": {"clip": STAGE_SEEDS["clip"]}},
        "vae": save("vae", built.vae.state_dict(), meta) | {"seeds": {k: STAGE_SEEDS[k] for k in ("data", "vae")}},
        "detector": save("detector", built.det.state_dict(), meta)
        | {"seeds": {k: STAGE_SEEDS[k] for k in ("vae", "detector")}},
    }
    for name in ("original", "never_learned"):
        files[name] = save(name, built.unets[name].state_dict(), meta) | {
            "seeds": {**base_seeds, "unet": STAGE_SEEDS["unet"]}}
    for name, (stored, vlog) in built.variants.items():
        seeds = {**base_seeds, "unet": STAGE_SEEDS["unet"]}
        if "seed" in vlog["recipe"]:
            seeds[name] = vlog["recipe"]["seed"]
        files[name] = save(name, stored, {**meta, "base": "original"}) | {"seeds": seeds, "base": "original"}
    for rec in files.values():
        rec["built_by"] = by
    save_png(sheet, out / "samples.png")
    return files


def recipe(args, built: Built) -> dict:
    erase, logs = args.erase, built.logs
    return {
        "dataset": f"{args.images_per_concept} images per concept (never_learned: the same minus '{erase}')"
                   + (f", radius scaled per concept {data.parse_size_scale(args.size_scale)}" if args.size_scale else "")
                   + (f"; phase 3 and the detector: radius scaled per concept "
                      f"{data.parse_size_scale(args.calibrate_size_scale)}" if args.calibrate_steps > 0 else ""),
        **({"unconditional_extras": {"images": args.unconditional_extras, "seed": STAGE_SEEDS["extras"],
                                     "kinds": list(micro_detector.UNCONDITIONAL_EXTRA_KINDS),
                                     "caption": "the empty prompt only (both UNets)",
                                     "made_by": "memora_build.micro_detector.unconditional_extras"}}
           if args.unconditional_extras else {}),
        "vae": {"steps": args.vae_steps, "batch": 16, "lr": 2e-3,
                "loss": f"L1 + MSE + {VAE_LOWFREQ} x MSE of 8x8 averages + {VAE_KL} KL", **logs["vae"]},
        "unet": {"phase1": {"steps": args.unet_steps, "lr": args.unet_lr, "batches": "uniform", "ema": UNET_EMA,
                            "seed": STAGE_SEEDS["unet"]},
                 "phase2": {"steps": args.finetune_steps, "lr": args.finetune_lr, "batches": "class-balanced",
                            "ema": FINETUNE_EMA, "seed": STAGE_SEEDS["finetune"], "init": "phase 1's EMA weights"},
                 **({"phase3": {"steps": args.calibrate_steps, "lr": args.calibrate_lr, "batches": "class-balanced",
                                "ema": FINETUNE_EMA, "seed": STAGE_SEEDS["calibrate"],
                                "weight_decay": CALIBRATE_WEIGHT_DECAY,
                                "init": "phase 2's EMA weights (phase 1's for a model --finetune-models leaves out)",
                                "note": "the seed is phase 2's: phase 3 draws the same batch indices, caption "
                                        "drops, timesteps and noise as phase 2 (on its own drawings); a folded "
                                        "row's gradient on eps(c) is w^2 times a plain row's",
                                "guidance_fold": parse_guidance_fold(args.calibrate_guidance),
                                "size_scale": data.parse_size_scale(args.calibrate_size_scale),
                                "what": "the calibration: the world's own drawings (same seeds, the size scale "
                                        "above); for the guidance_fold concepts the guided prediction "
                                        "eps('') + w (eps(c) - eps('')) is fitted, eps('') without a gradient "
                                        "(micro_diffusion.train_eps)"}}
                    if args.calibrate_steps > 0 else {}),
                 "batch": args.unet_batch, "schedule": f"cosine, {UNET_WARMUP} warm-up (each phase)",
                 "parallel_jobs": args.jobs,
                 "objective": f"eps MSE with min-SNR-{UNET_MIN_SNR:g} weighting, t uniform 0..999, SD scaled_linear betas",
                 "caption_dropout": 0.1, **logs["unet"]},
        "variants": {name: vlog for name, (_, vlog) in built.variants.items()},
        "detector": logs["detector"],
        "text_encoder": {"init": "transformers' CLIPTextModel initialisation, seeded",
                         "pretraining": "memora_build.micro_text.pretrain: distinct per-prompt directions",
                         **logs["clip"]},
    }


def manifest(args, built: Built, results: dict, files: dict, build_info: dict) -> dict:
    """Stage 8b: manifest.json's content (configurations, variants, files with their sha256, seeds, arguments,
    recipe, measurements, build facts)."""
    return {
        "about": "MemoRa micro world v2: see docs/micro-world.md",
        "size_scale": data.parse_size_scale(world_size_scale(args)),  # the world's shapes (world.size_scale)
        "concepts": list(data.CONCEPTS),
        "erased_concept": args.erase,
        "prompts": {c: data.caption(c) for c in data.CONCEPTS},
        "image_size": data.IMAGE_SIZE,
        "latent_size": latent_hw(),
        "empty_latent_size": world.EMPTY_LATENT_SIZE,
        "unet_config": world.UNET_CONFIG,
        "vae_ddconfig": world.VAE_DDCONFIG,
        "vae_embed_dim": world.VAE_EMBED_DIM,
        "vae_downscale": world.VAE_DOWNSCALE,
        "clip_config": text.CLIP_CONFIG,
        "latent_format": "SD1.x (scale 0.18215); the VAE's latent space is re-expressed so that latents x 0.18215 "
                         "have zero mean and unit standard deviation per channel on the training images",
        "variants": {name: {"base": world.BASES[name], "erased": list(world.ERASED[name]),
                            "file": name} for name in world.VARIANTS},
        "files": files,
        "shared": "clip, vae and detector are shared by every model; a variant with a base is that base's UNet with "
                  "its own file's tensors put over it",
        "seeds": STAGE_SEEDS,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("out", "reuse", "reuse_phase1", "reuse_phase2", "unet_worker", "work", "snapshots")},
        "recipe": recipe(args, built),
        "measurements": {
            "how": (f"{args.eval_images} images per concept and model, DDIM {args.eval_steps} steps, cfg "
                    f"{args.eval_cfg}, noise seeds {1000 * STAGE_SEEDS['eval']} + concept index; rate = share of "
                    f"images whose detector top class is the prompted concept ({CONVENTION}); 95 % Wilson "
                    f"intervals"),
            "rates": rate_table(results),
            "targets": {"erased_rate_max": 0.10, "kept_over_original_min": 0.80, "per_variant": targets(results)},
            "detector_judge_agreement": agreement(results),
            "labels": "labels.json: per model and prompted concept, the detector's (and the judge's) class per image",
        },
        "build": build_info,
    }


def markdown_tables(m: dict) -> str:
    """docs/micro-world.md's tables from a manifest: rates per model and concept (with the Wilson intervals), the
    targets, the detector's accuracy and confusion matrix, the detector/judge agreement and the stage times."""
    concepts, rates = m["concepts"], m["measurements"]["rates"]
    n = next(iter(next(iter(rates.values())).values()))["n"]
    lines = ["| model (erased) | " + " | ".join(concepts) + " | targets met |", "|---|" + "---|" * (len(concepts) + 1)]
    per = m["measurements"]["targets"]["per_variant"]
    for name, r in rates.items():
        erased = m["variants"][name]["erased"]
        cells = []
        for c in concepts:
            cell = f"{r[c]['rate']:.2f} ({r[c]['ci_low']:.2f}-{r[c]['ci_high']:.2f})"
            cells.append(f"**{cell}**" if c in erased else cell)
        met = "-" if name == "original" else ("yes" if per[name]["met"] else "no")
        lines.append(f"| {name} ({', '.join(erased) or 'none'}) | " + " | ".join(cells) + f" | {met} |")
    lines += ["", f"n = {n} images per model and concept; {m['measurements']['how']}.", "",
              "| variant | kept concept / original |", "|---|---|"]
    for name, t in per.items():
        lines.append(f"| {name} | " + ", ".join(f"{c} {v:.2f}" if v is not None else f"{c} n/a"
                                                   for c, v in t["kept_over_original"].items()) + " |")
    ev = m["recipe"]["detector"].get("evaluation")
    if ev:
        classes = ev["classes"]
        lines += ["", f"Detector on held-out procedural images ({ev['n_per_class']} per class: {ev['images_per_class']} "
                      f"drawn + their VAE round trips; seed {ev['seed']}):", "",
                  "| true \\ called | " + " | ".join(classes) + " | accuracy |", "|---|" + "---|" * (len(classes) + 1)]
        for c, row in zip(classes, ev["confusion"]):
            lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + f" | {ev['per_class'][c]:.3f} |")
        if "hard_negatives" in ev:
            h = ev["hard_negatives"]
            lines += ["", f"Hard negatives (near-shapes, n = {h['n']}) called none: {h['none_rate']:.3f}; per kind: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in h["per_kind"].items())]
    agree = m["measurements"].get("detector_judge_agreement")
    if agree:
        lines += ["", "| model | detector and judge agree |", "|---|---|"]
        lines += [f"| {k} | {v['rate']:.3f} ({v['ci_low']:.3f}-{v['ci_high']:.3f}, n = {v['n']}) |"
                  for k, v in agree.items()]
    b = m["build"]
    lines += ["", f"Build: {b['seconds']:.0f} s wall ({b['threads']} thread(s) in the main process); stages (s): "
                  + ", ".join(f"{k} {v}" for k, v in b["stage_seconds"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.unet_worker:
        return unet_worker(args)
    if args.tables:
        print(markdown_tables(world.load_manifest(args.tables)))
        return 0
    if (args.retrain_detector or args.measure_only or args.variants) and not args.reuse:
        raise SystemExit("--retrain-detector, --measure-only and --variants go with --reuse")
    only = check_variant_names(args.variants)
    t_all, cpu_all = time.perf_counter(), time.process_time()
    torch.set_num_threads(max(1, args.threads))
    comfy_path = boot_comfy()
    use_fast_attention()
    timer = Timer()
    calibration = None
    if args.calibrate_steps > 0 and not args.reuse:
        # phase 3's drawings: the same seeds, the world's size scale
        data.set_size_scale(data.parse_size_scale(args.calibrate_size_scale))
        imgs3, labels3 = data.make_dataset(args.images_per_concept, STAGE_SEEDS["data"], data.CONCEPTS)
        calibration = (data.to_tensor_range(imgs3), labels3)
    data.set_size_scale(data.parse_size_scale(args.size_scale))  # the VAE's and phases 1-2's drawings
    x_all, labels, none_imgs, extras = make_data(args)
    timer.done("data")
    if args.reuse:
        data.set_size_scale(data.parse_size_scale(world_size_scale(args)))  # the world's (forked workers too)
        # stages 2-5 from an earlier build with the same arguments and seeds (what they would compute again)
        built = reuse_build(args, comfy_path, timer)
        timer.seconds.update(built.reused["stage_seconds"])
    else:
        built = train_stages(args, comfy_path, x_all, labels, none_imgs, extras, timer, calibration=calibration)
    timer.t0 = time.perf_counter()
    if args.measure_only:
        reuse_variants(args, built, timer)
        results = measure(args, built)
        timer.done("evaluation")
    else:
        if only:
            reuse_variants(args, built, timer, skip=only)
        results = variants_and_measure(args, built, timer, only=only)
    out = Path(args.out)
    files = save_networks(args, out, built, contact_sheet(results))
    atomic_write(out / "labels.json", json.dumps({n: r["labels"] for n, r in results.items()}), replace=True)
    build_info = {"seconds": round(time.perf_counter() - t_all, 1), "cpu_seconds": round(time.process_time() - cpu_all, 1),
                  "threads": args.threads, "stage_seconds": timer.seconds, "reused": built.reused,
                  "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    atomic_write(out / world.MANIFEST, json.dumps(manifest(args, built, results, files, build_info), indent=1,
                                                   sort_keys=False), replace=True)
    for name, t in targets(results).items():
        log(f"{name}: erased {t['erased_rates']}, kept / original {t['kept_over_original']}, targets met: {t['met']}")
    log(f"wrote {out} in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
