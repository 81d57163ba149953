#!/usr/bin/env python
"""Build the MemoRa micro world from scratch on a CPU: data, VAE, text encoder, detector, original / never-learned
UNets, the ESD-x unlearned UNet, measurements, and the shipped safetensors + manifest.

    python scripts/build_micro_world.py                  # writes memora/micro/weights/
    python scripts/build_micro_world.py --out /tmp/mw    # somewhere else

Seeded end to end (one seed per stage, written to the manifest). The networks are ComfyUI's own ldm classes
(UNetModel, AutoencoderKL) so the weights load in ComfyUI without any key conversion: a ComfyUI checkout is needed
($COMFYUI_PATH, else ~/comfy/ComfyUI). The main process uses --threads torch threads (default 2); the original and
never-learned UNets train in two worker processes of one thread each (--jobs 2, the default), which on a 2-core
machine halves that stage's wall time. About 21 minutes on 2 cores; --reuse DIR redoes only ESD and the
measurements. See docs/micro-world.md for the recipe and the measured results.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
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

from memora.fileio import atomic_write  # noqa: E402
from memora.micro import data, detector, text, world  # noqa: E402
from memora_build import micro_detector, micro_diffusion as diffusion, micro_text  # noqa: E402

UNET_EMA = 0.995
VAE_KL = 1e-6
VAE_LOWFREQ = 1.0
UNET_WARMUP = 30
UNET_MIN_SNR = 5.0
STAGE_SEEDS = {"data": 1, "vae": 2, "clip": 3, "detector": 4, "unet": 5, "esd": 6, "eval": 7}


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


def evaluate(unet, vae, det, contexts, uncond, *, n: int, seed: int, cfg: float, steps: int) -> dict:
    out = {}
    samples = {}
    for ci, concept in enumerate(data.CONCEPTS):
        imgs = generate(unet, vae, contexts[ci], uncond, n, seed + ci, cfg, steps)
        probs = detector.probabilities(det, imgs.clamp(-1, 1))
        out[concept] = detector.rates(probs)[concept]
        samples[concept] = to_uint8(imgs[:8])
    return {"rates": out, "samples": samples}


# -- saving --------------------------------------------------------------------------------------------------------
def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None):
    from safetensors.torch import save

    data_ = save({k: v.detach().contiguous().to(torch.float32).cpu() for k, v in sorted(tensors.items())},
                 metadata=metadata)
    atomic_write(path, data_, replace=True)


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


REUSABLE_ARGS = ("images_per_concept", "vae_steps", "unet_steps", "unet_batch", "unet_lr", "detector_steps", "erase")


def reuse_build(args, comfy_path) -> Built:
    """Load the VAE, text encoder, detector and the two trained UNets of an earlier build (``--reuse DIR``) instead
    of training them again: only ESD, the measurements and the files are redone. Refused unless the earlier build
    used the same arguments for those stages (the seeds are fixed in this script)."""
    from safetensors.torch import load_file

    prev_dir = Path(args.reuse)
    prev = json.loads((prev_dir / world.MANIFEST).read_text())
    for k in REUSABLE_ARGS:
        if prev["args"].get(k) != getattr(args, k):
            raise SystemExit(f"--reuse {prev_dir}: it was built with {k}={prev['args'].get(k)!r}, this run has "
                             f"{getattr(args, k)!r}; rebuild from scratch instead")
    files = prev["files"]
    vae = make_vae(STAGE_SEEDS["vae"])
    vae.load_state_dict(load_file(str(prev_dir / files["vae"])))
    vae.eval()
    tok = text.tokenizer(Path(comfy_path) / "comfy" / "sd1_tokenizer")
    prefix = "cond_stage_model.transformer."
    clip = text.load_text_model({k[len(prefix):]: v for k, v in load_file(str(prev_dir / files["clip"])).items()})
    ctx = text.encode(clip, tok, [data.caption(c) for c in data.CONCEPTS] + [""])
    recipe = prev["recipe"]
    det = detector.Detector(width=int(recipe["detector"].get("width", 16)))
    det.load_state_dict(load_file(str(prev_dir / files["detector"])))
    det.eval()
    unets = {}
    for name in ("original", "never_learned"):
        unet = make_unet(STAGE_SEEDS["unet"])
        unet.load_state_dict(load_file(str(prev_dir / files[name])))
        unets[name] = unet.eval()
    logs = {"vae": {k: v for k, v in recipe["vae"].items() if k not in ("steps", "batch", "lr", "loss")},
            "clip": {k: v for k, v in recipe["text_encoder"].items() if k not in ("init", "pretraining")},
            "detector": dict(recipe["detector"]),
            "unet": {n: recipe["unet"][n] for n in ("original", "never_learned")}}
    stages = ["vae", "clip", "detector", "unets"]
    reused = {"from": str(prev_dir), "stages": stages,
              "stage_seconds": {k: v for k, v in prev["build"]["stage_seconds"].items() if k in stages},
              "earlier_build_seconds": prev["build"]["seconds"]}
    log(f"reused the VAE, text encoder, detector and UNets of {prev_dir} (built in {prev['build']['seconds']} s)")
    return Built(vae, clip, ctx[:-1], ctx[-1], det, unets, logs, reused)


def unet_worker(args) -> int:
    """Train one UNet (``--unet-worker NAME``) from the inputs the main process saved in ``--work``."""
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

    tl = diffusion.train_eps(unet, inp["z"], inp["labels"], inp["contexts"], inp["uncond"], steps=args.unet_steps,
                             batch=args.unet_batch, lr=args.unet_lr, seed=STAGE_SEEDS["unet"], ema_decay=UNET_EMA,
                             warmup=UNET_WARMUP, min_snr_gamma=UNET_MIN_SNR, progress=progress, balanced=True,
                             snapshot=snapshot if args.snapshots else None, snapshot_every=1000)
    torch.save({"state_dict": unet.state_dict(), "log": {"loss": tl.summary(4), "seconds": round(tl.seconds, 1)}},
               Path(args.work) / f"{name}.out.pt")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=world.WEIGHTS_DIR, help="output folder (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads of the main process (default 2)")
    ap.add_argument("--images-per-concept", type=int, default=1000)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--unet-batch", type=int, default=64)
    ap.add_argument("--unet-lr", type=float, default=2e-3)
    ap.add_argument("--esd-steps", type=int, default=60)
    ap.add_argument("--detector-steps", type=int, default=600)
    ap.add_argument("--eval-images", type=int, default=32, help="images per concept and model for the measurements")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--eval-cfg", type=float, default=7.5)
    ap.add_argument("--erase", default=world.ERASED_CONCEPT, choices=list(data.CONCEPTS))
    ap.add_argument("--esd-method", default="x", choices=["x", "u"])
    ap.add_argument("--esd-lr", type=float, default=1e-3)
    ap.add_argument("--esd-negative-guidance", type=float, default=1.0)
    ap.add_argument("--preserve-weight", type=float, default=0.0,
                    help="ESD plus a preservation term on the other prompts (0 = plain ESD)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="train the original and never-learned UNets in parallel processes (default 2; 1 = in turn)")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="take the VAE, text encoder, detector and trained UNets from this earlier build (same "
                         "arguments required) and redo only ESD, the measurements and the files")
    ap.add_argument("--snapshots", type=Path, default=None,
                    help="also save the UNets' EMA weights every 1,000 updates here (to watch a long run)")
    ap.add_argument("--unet-worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


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
    """Stage 1: the training images of the five concepts (labels index data.CONCEPTS) and the ``none`` images."""
    imgs, labels = data.make_dataset(args.images_per_concept, STAGE_SEEDS["data"], data.CONCEPTS)
    none_imgs, _ = data.make_dataset(args.images_per_concept // 4, STAGE_SEEDS["data"], (data.NONE,))
    return data.to_tensor_range(imgs), labels, none_imgs


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
    """Stage 4: the concept detector, trained on drawn images and their VAE round trips, measured on held-out ones."""
    n_det = max(200, args.images_per_concept // 2)
    d_imgs, d_labels = data.make_dataset(n_det, 200 + STAGE_SEEDS["detector"], data.DETECTOR_CLASSES)
    d_x = data.to_tensor_range(d_imgs)
    n_rt = d_x.shape[0] // 3  # a third of the images also as VAE round trips
    d_rt = decode(vae, encode_means(vae, d_x[:n_rt])).clamp(-1, 1)
    det_x = torch.cat([d_x, d_rt])
    det_y = torch.cat([torch.from_numpy(d_labels), torch.from_numpy(d_labels[:n_rt])])
    det, det_log = micro_detector.train_detector(det_x, det_y, steps=args.detector_steps, batch=64, lr=3e-3,
                                                 seed=STAGE_SEEDS["detector"])
    t_imgs, t_labels = data.make_dataset(100, 300 + STAGE_SEEDS["detector"], data.DETECTOR_CLASSES)
    t_x = data.to_tensor_range(t_imgs)
    t_y = torch.from_numpy(t_labels)
    t_rt = decode(vae, encode_means(vae, t_x)).clamp(-1, 1)
    det_log.update({
        "held_out_accuracy_drawn": micro_detector.accuracy(det, t_x, t_y),
        "held_out_accuracy_vae_round_trip": micro_detector.accuracy(det, t_rt, t_y),
        "held_out_images_per_class": 100,
        "confusion_vae_round_trip (rows true, cols predicted)": micro_detector.confusion(det, t_rt, t_y),
        "classes": list(data.DETECTOR_CLASSES),
        "width": 16,
    })
    log(f"detector held-out accuracy: drawn {det_log['held_out_accuracy_drawn']:.3f}, "
        f"VAE round trip {det_log['held_out_accuracy_vae_round_trip']:.3f}")
    return det, det_log


def unets_stage(args, z: torch.Tensor, labels, contexts: torch.Tensor, uncond: torch.Tensor):
    """Stage 5: the original UNet (every concept) and the never-learned one (all but the erased concept), trained in
    worker processes (``--unet-worker``), in parallel with --jobs 2 (one thread each)."""
    lab = torch.from_numpy(labels)
    jobs = {"original": torch.ones_like(lab, dtype=torch.bool), "never_learned": lab != data.CONCEPTS.index(args.erase)}
    unets, unet_logs = {}, {}
    with tempfile.TemporaryDirectory(prefix="memora-micro-build-") as work:
        procs = {}
        for name, keep in jobs.items():
            torch.save({"z": z[keep].clone(), "labels": lab[keep].clone(), "contexts": contexts, "uncond": uncond},
                       Path(work) / f"{name}.in.pt")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--unet-worker", name, "--work", work,
                   "--unet-steps", str(args.unet_steps), "--unet-batch", str(args.unet_batch),
                   "--unet-lr", str(args.unet_lr), "--threads", "1" if args.jobs > 1 else str(args.threads)]
            if args.snapshots:
                cmd += ["--snapshots", str(args.snapshots)]
            procs[name] = subprocess.Popen(cmd)
            if args.jobs <= 1:
                procs[name].wait()
        for name, proc in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"UNet training for {name!r} failed (exit code {proc.returncode})")
            out = torch.load(Path(work) / f"{name}.out.pt")
            unet = make_unet(STAGE_SEEDS["unet"])
            unet.load_state_dict(out["state_dict"])
            unet.eval()
            unets[name] = unet
            unet_logs[name] = {"images": int(jobs[name].sum()), **out["log"]}
    return unets, unet_logs


def train_stages(args, comfy_path, x_all, labels, none_imgs, timer: Timer) -> Built:
    """Stages 2-5 from scratch: VAE, text encoder, detector, the two trained UNets."""
    vae, z, vae_log = vae_stage(args, x_all, none_imgs)
    timer.done("vae")
    clip, ctx, clip_log = text_stage(comfy_path)
    contexts, uncond = ctx[:-1], ctx[-1]
    timer.done("clip")
    det, det_log = detector_stage(args, vae)
    timer.done("detector")
    unets, unet_logs = unets_stage(args, z, labels, contexts, uncond)
    timer.done("unets")
    return Built(vae, clip, contexts, uncond, det, unets,
                 {"vae": vae_log, "clip": clip_log, "detector": det_log, "unet": unet_logs})


def esd_stage(args, built: Built):
    """Stage 6: the unlearned UNet, an ESD fine-tune of a copy of the original (added to ``built.unets``)."""
    erased_idx = data.CONCEPTS.index(args.erase)
    unlearned = copy.deepcopy(built.unets["original"])
    others = torch.stack([built.contexts[i] for i in range(len(data.CONCEPTS)) if i != erased_idx])
    esd_log = diffusion.esd_train(unlearned, built.contexts[erased_idx], built.uncond, method=args.esd_method,
                                  steps=args.esd_steps, batch=32, lr=args.esd_lr, seed=STAGE_SEEDS["esd"],
                                  negative_guidance=args.esd_negative_guidance,
                                  preserve_ctx=others if args.preserve_weight > 0 else None,
                                  preserve_weight=args.preserve_weight,
                                  progress=lambda s, t, loss: (s % 50 == 0) and log(f"  esd step {s}/{t}: loss {loss:.5f}"))
    built.unets["unlearned"] = unlearned
    return esd_log


def measure(args, built: Built):
    """Stage 7: each variant's detection rate per concept, the sample sheets, and the kept-concept ratios."""
    results, sheets = {}, []
    for name in world.VARIANTS:
        ev = evaluate(built.unets[name], built.vae, built.det, built.contexts, built.uncond, n=args.eval_images,
                      seed=1000 * STAGE_SEEDS["eval"], cfg=args.eval_cfg, steps=args.eval_steps)
        results[name] = ev["rates"]
        sheets.append(np.concatenate([ev["samples"][c] for c in data.CONCEPTS]))
        log(f"  {name}: " + ", ".join(f"{c} {r:.2f}" for c, r in ev["rates"].items()))
    ratios = {c: (results["unlearned"][c] / results["original"][c] if results["original"][c] > 0 else None)
              for c in data.CONCEPTS if c != args.erase}
    return results, sheets, ratios


def save_networks(out: Path, built: Built, sheets):
    """Stage 8a: the safetensors files (every tensor float32, keys sorted) and samples.png."""
    meta = {"format": "memora micro world", "build": "scripts/build_micro_world.py"}
    save_safetensors({"cond_stage_model.transformer." + k: v for k, v in built.clip.state_dict().items()
                      if "position_ids" not in k}, out / world.FILES["clip"], meta)
    save_safetensors(built.vae.state_dict(), out / world.FILES["vae"], meta)
    save_safetensors(built.det.state_dict(), out / world.FILES["detector"], meta)
    for name in world.VARIANTS:
        save_safetensors(built.unets[name].state_dict(), out / world.FILES[name], meta)
    save_png(data.grid(np.concatenate(sheets), cols=8, scale=3), out / "samples.png")


def recipe(args, built: Built, esd_log) -> dict:
    erase, logs = args.erase, built.logs
    return {
        "dataset": f"{args.images_per_concept} images per concept (never_learned: the same minus '{erase}')",
        "vae": {"steps": args.vae_steps, "batch": 16, "lr": 2e-3,
                "loss": f"L1 + MSE + {VAE_LOWFREQ} x MSE of 8x8 averages + {VAE_KL} KL", **logs["vae"]},
        "unet": {"steps": args.unet_steps, "batch": args.unet_batch, "lr": args.unet_lr,
                 "schedule": f"cosine, {UNET_WARMUP} warm-up", "parallel_jobs": args.jobs,
                 "objective": f"eps MSE with min-SNR-{UNET_MIN_SNR:g} weighting, t uniform 0..999, SD scaled_linear betas",
                 "caption_dropout": 0.1, "batches": "class-balanced",
                 "ema": UNET_EMA, **logs["unet"]},
        "esd": {"method": f"ESD-{args.esd_method}", "steps": args.esd_steps, "batch": 32, "lr": args.esd_lr,
                "negative_guidance": args.esd_negative_guidance, "sample_steps": 20, "sample_cfg": 3.0,
                "preserve_weight": args.preserve_weight, "loss": esd_log.summary(2),
                "seconds": round(esd_log.seconds, 1)},
        "detector": logs["detector"],
        "text_encoder": {"init": "transformers' CLIPTextModel initialisation, seeded",
                         "pretraining": "memora_build.micro_text.pretrain: distinct per-prompt directions",
                         **logs["clip"]},
    }


def manifest(args, built: Built, esd_log, measured, build_info: dict) -> dict:
    """Stage 8b: manifest.json's content (configurations, seeds, arguments, recipe, measurements, build facts)."""
    results, _, ratios = measured
    erase = args.erase
    return {
        "about": "MemoRa micro world: see docs/micro-world.md",
        "concepts": list(data.CONCEPTS),
        "erased_concept": erase,
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
        "files": dict(world.FILES),
        "shared": "clip.safetensors and vae.safetensors are identical for all three variants; the UNets differ",
        "seeds": STAGE_SEEDS,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("out", "reuse", "unet_worker", "work", "snapshots")},
        "recipe": recipe(args, built, esd_log),
        "measurements": {
            "how": (f"{args.eval_images} images per concept and model, DDIM {args.eval_steps} steps, cfg "
                    f"{args.eval_cfg}, noise seeds {1000 * STAGE_SEEDS['eval']} + concept index; rate = share of "
                    f"images whose detector top class is the prompted concept"),
            "rates": results,
            "erased_rate_unlearned": results["unlearned"][erase],
            "other_concepts_unlearned_over_original": ratios,
            "targets": {"erased_rate_unlearned_max": 0.10, "others_ratio_min": 0.80},
        },
        "build": build_info,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.unet_worker:
        return unet_worker(args)
    t_all, cpu_all = time.perf_counter(), time.process_time()
    torch.set_num_threads(max(1, args.threads))
    comfy_path = boot_comfy()
    use_fast_attention()
    timer = Timer()
    x_all, labels, none_imgs = make_data(args)
    timer.done("data")
    if args.reuse:
        # stages 2-5 from an earlier build with the same arguments and seeds (what they would compute again)
        built = reuse_build(args, comfy_path)
        timer.seconds.update(built.reused["stage_seconds"])
    else:
        built = train_stages(args, comfy_path, x_all, labels, none_imgs, timer)
    timer.t0 = time.perf_counter()
    esd_log = esd_stage(args, built)
    timer.done("esd")
    measured = measure(args, built)
    timer.done("evaluation")
    out = Path(args.out)
    save_networks(out, built, measured[1])
    build_info = {"seconds": round(time.perf_counter() - t_all, 1), "cpu_seconds": round(time.process_time() - cpu_all, 1),
                  "threads": args.threads, "stage_seconds": timer.seconds, "reused": built.reused,
                  "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    atomic_write(out / world.MANIFEST, json.dumps(manifest(args, built, esd_log, measured, build_info), indent=1,
                                                   sort_keys=False), replace=True)
    results, _, ratios = measured
    log(f"erased '{args.erase}': unlearned rate {results['unlearned'][args.erase]:.3f} (original "
        f"{results['original'][args.erase]:.3f}); others unlearned/original: "
        + ", ".join(f"{c} {r:.2f}" if r is not None else f"{c} n/a" for c, r in ratios.items()))
    log(f"wrote {out} in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
