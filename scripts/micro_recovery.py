#!/usr/bin/env python
"""MemoRa on the micro world, through ComfyUI's own executor (in this process, CPU).

    python scripts/micro_recovery.py                   # one recovery of the erased concept; prints rates and files
    python scripts/micro_recovery.py --curves          # + the residual-memory experiment: recovery curves of the
                                                       #   unlearned model and the never-learned control
                                                       #   -> docs/micro-recovery.md, docs/img/micro-recovery.png

Every stage is a stock ComfyUI node or a node of this pack, run by ComfyUI's executor: the original model draws the
seed images (one KSampler per reference seed), the model under test (--variant, default esd_x, or never-learned) encodes, inverts
(MemoRa DDIM Inversion), slerps (MemoRa Slerp Latents) and regenerates them (MemoRa Regenerate), MemoRa LoRA Train
trains the LoRA on it, the recovered model generates the evaluation images, MemoRa Micro World Detector scores them
and MemoRa Similarity Score compares them with the original model's images for the same prompt and seed.

A ComfyUI checkout is needed ($COMFYUI_PATH, else ~/comfy/ComfyUI). ComfyUI's folders (models/loras, output) are
under --base (default: a fresh temporary folder, printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "tests" / "support"
for p in (str(ROOT), str(SUPPORT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from memora_batch.profiles import MICRO_LORA  # noqa: E402

SEED_PAIRS = ((1805, 2821), (1405, 2421), (1705, 2721))  # the reference's seed pairs


@dataclass
class Settings:
    """The micro world's MemoRa settings (the reference's, except where the micro world needs otherwise)."""

    steps: int = 50  # DDIM steps for seed images, inversion and regeneration (reference: 50)
    start_at_step: int = 15  # reference: 15
    cfg: float = 7.5  # reference: 7.5
    slerp_intervals: int = 10  # reference: 10 -> 33 latents
    refine_iterations: int = 0  # reference: 0 (plain DDIM inversion)
    lora_steps: int = MICRO_LORA["steps"]  # the micro profile's recipe (memora_batch.profiles.MICRO_LORA)
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_lr: float = MICRO_LORA["learning_rate"]  # reference: 1e-4 for SD1.4 (500 steps); 1e-2 destroys every concept
    lora_batch: int = 1
    lora_accumulation: int = 4
    lora_seed: int = 2024
    eval_images: int = 32
    eval_seed: int = 1
    eval_steps: int = 50
    eval_cfg: float = 7.5
    seed_pairs: tuple = SEED_PAIRS
    notes: list = field(default_factory=list)


def boot(base: Path):
    """ComfyUI in this process with the pack loaded; its folders under ``base``."""
    from memora_batch.embedded import EmbeddedComfy, find_comfyui

    comfy_path = find_comfyui()
    if comfy_path is None:
        sys.exit("no ComfyUI checkout found: set COMFYUI_PATH or put one at ~/comfy/ComfyUI")
    cn = base / "custom_nodes"
    cn.mkdir(parents=True, exist_ok=True)
    link = cn / "comfyui-memora"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    return EmbeddedComfy.boot(comfy_path, [link], base_directory=base, cpu=True)


def manifest() -> dict:
    from memora.micro import world

    return world.load_manifest()


class Pipeline:
    """Builds the API-format graphs (tests/support/graphs.Graph)."""

    def __init__(self, s: Settings, concept: str, prompt: str, empty_latent_size: int):
        self.s = s
        self.concept = concept
        self.prompt = prompt
        self.size = empty_latent_size  # Empty Latent Image's width/height (it divides by 8; the micro VAE is 4x)

    def graph(self, variant: str, lora_steps: int, save_name: str = "memora/micro_recovered",
              prefix: str = "micro") -> tuple:
        """One graph: seed images -> inversion/slerp/regeneration on ``variant`` -> LoRA (``lora_steps``; 0 = none)
        -> evaluation images of the original and of the recovered model -> detector + similarity. Returns the graph
        and the ids of the nodes to read."""
        from graphs import Graph

        s = self.s
        g = Graph()
        orig = g.node("MemoRaLoadMicroWorld", variant="original")
        test = orig if variant == "original" else g.node("MemoRaLoadMicroWorld", variant=variant)
        pos_o = g.node("CLIPTextEncode", text=self.prompt, clip=orig[1])
        neg_o = g.node("CLIPTextEncode", text="", clip=orig[1])
        pos_t = g.node("CLIPTextEncode", text=self.prompt, clip=test[1])
        neg_t = g.node("CLIPTextEncode", text="", clip=test[1])
        empty1 = g.node("EmptyLatentImage", width=self.size, height=self.size, batch_size=1)
        halves = []
        for half in (0, 1):
            lat = None
            for pair in s.seed_pairs:
                ks = g.node("KSampler", model=orig[0], positive=pos_o[0], negative=neg_o[0], latent_image=empty1[0],
                            seed=pair[half], steps=s.steps, cfg=s.cfg, sampler_name="ddim",
                            scheduler="ddim_uniform", denoise=1.0)
                lat = ks if lat is None else g.node("LatentBatch", samples1=lat[0], samples2=ks[0])
            halves.append(lat)
        dec_a = g.node("VAEDecode", samples=halves[0][0], vae=orig[2])
        dec_b = g.node("VAEDecode", samples=halves[1][0], vae=orig[2])
        seeds = g.node("ImageBatch", image1=dec_a[0], image2=dec_b[0])
        g.node("SaveImage", images=seeds[0], filename_prefix=f"{prefix}/seed")
        inv = []
        for dec in (dec_a, dec_b):
            enc = g.node("VAEEncode", pixels=dec[0], vae=test[2])
            inv.append(g.node("MemoRaDDIMInversion", model=test[0], positive=pos_t[0], negative=neg_t[0],
                              latent=enc[0], steps=s.steps, start_at_step=s.start_at_step, cfg=s.cfg,
                              refine_iterations=s.refine_iterations, schedule="exact"))
        sl = g.node("MemoRaSlerpLatents", latent_a=inv[0][0], latent_b=inv[1][0], intervals=s.slerp_intervals,
                    include_endpoints=True)
        regen = g.node("MemoRaRegenerate", model=test[0], positive=pos_t[0], negative=neg_t[0], latent=sl[0],
                       steps=s.steps, start_at_step=s.start_at_step, cfg=s.cfg, schedule="exact")
        regen_img = g.node("VAEDecode", samples=regen[0], vae=test[2])
        g.node("SaveImage", images=regen_img[0], filename_prefix=f"{prefix}/regenerated_{variant}")
        model = test
        train = None
        if lora_steps > 0:
            train = g.node("MemoRaLoRATrain", model=test[0], latents=regen[0], positive=pos_t[0], steps=lora_steps,
                           rank=s.lora_rank, alpha=s.lora_alpha, learning_rate=s.lora_lr, lr_schedule="cosine",
                           batch_size=s.lora_batch, gradient_accumulation=s.lora_accumulation, targets="attention",
                           random_flip=True, precision="auto", gradient_checkpointing=False, seed=s.lora_seed,
                           save_name=save_name)
            model = train
        empty_n = g.node("EmptyLatentImage", width=self.size, height=self.size, batch_size=s.eval_images)
        ev_o = g.node("KSampler", model=orig[0], positive=pos_o[0], negative=neg_o[0], latent_image=empty_n[0],
                      seed=s.eval_seed, steps=s.eval_steps, cfg=s.eval_cfg, sampler_name="ddim",
                      scheduler="ddim_uniform", denoise=1.0)
        ev_r = g.node("KSampler", model=model[0], positive=pos_t[0], negative=neg_t[0], latent_image=empty_n[0],
                      seed=s.eval_seed, steps=s.eval_steps, cfg=s.eval_cfg, sampler_name="ddim",
                      scheduler="ddim_uniform", denoise=1.0)
        img_o = g.node("VAEDecode", samples=ev_o[0], vae=orig[2])
        img_r = g.node("VAEDecode", samples=ev_r[0], vae=test[2])
        g.node("SaveImage", images=img_r[0], filename_prefix=f"{prefix}/eval_{variant}_lora{lora_steps}")
        det_o = g.node("MemoRaMicroDetector", images=img_o[0], concept=self.concept, title="original")
        det_r = g.node("MemoRaMicroDetector", images=img_r[0], concept=self.concept,
                       title=f"{variant} + LoRA {lora_steps}")
        sim = g.node("MemoRaSimilarityScore", original=img_o[0], recovered=img_r[0])
        ids = {"det_original": det_o.id, "det": det_r.id, "sim": sim.id, "train": train.id if train else None,
               "regen_img": regen_img.id, "seeds": seeds.id, "eval_img": img_r.id, "orig_img": img_o.id}
        return g.prompt, ids


def run_point(comfy, pipe: Pipeline, variant: str, lora_steps: int, **kw) -> dict:
    prompt, ids = pipe.graph(variant, lora_steps, **kw)
    t0 = time.perf_counter()
    res = comfy.run(prompt)
    if not res.success:
        raise RuntimeError(f"{variant} / LoRA {lora_steps}: ComfyUI run failed: {res.error_message}")
    out = {"variant": variant, "lora_steps": lora_steps, "seconds": round(time.perf_counter() - t0, 1)}
    out["rate"] = float(comfy.node_outputs(ids["det"])[0])
    out["rate_original"] = float(comfy.node_outputs(ids["det_original"])[0])
    sim = comfy.node_outputs(ids["sim"])
    out["ssim"], out["psnr"] = float(sim[0]), float(sim[1])
    if ids["train"]:
        out["lora_file"] = comfy.node_outputs(ids["train"])[3]
        loss = comfy.node_outputs(ids["train"])[2]
        out["final_loss"] = float(loss["loss"][-1]) if loss and loss.get("loss") else None
    out["_images"] = {k: comfy.node_outputs(ids[k])[0] for k in ("seeds", "regen_img", "eval_img", "orig_img")}
    return out


def _public(point: dict) -> dict:
    return {k: v for k, v in point.items() if not k.startswith("_")}


def curves(comfy, pipe: Pipeline, steps_list, variants=("esd_x", "never_learned"), log=print) -> dict:
    """The recovery curve of each model in ``variants``: the unlearned one under test first, the control last."""
    results = {v: [] for v in variants}
    for v in variants:
        for n in steps_list:
            p = run_point(comfy, pipe, v, n, save_name=f"memora/micro_curve_{v}", prefix="micro_curves")
            results[v].append(p)
            log(f"  {v:>13} LoRA {n:>4} steps: detector rate {p['rate']:.3f}  SSIM {p['ssim']:.3f}  "
                f"({p['seconds']:.0f} s)")
    return results


def verdict(results: dict, original_rate: float, quick: int) -> str:
    """Short-term vs long-term reading of the two curves (docs/method.md's terms), in words: when each curve
    first reaches half of the original's rate, its peak, and what the control says about residual memory."""
    u = next((pts for v, pts in results.items() if v != "never_learned"), [])
    n = results.get("never_learned", [])
    if not u or not n:
        return ""

    def first_reaching(points, level):
        for p in points:
            if p["rate"] >= level:
                return p["lora_steps"]
        return None

    def peak(points):
        best = max(points, key=lambda p: p["rate"])
        return best["rate"], best["lora_steps"]

    level = 0.5 * original_rate
    fu, fn = first_reaching(u, level), first_reaching(n, level)
    (pu, su), (pn, sn) = peak(u), peak(n)
    last = u[-1]["lora_steps"]
    lines = [f"Peak detector rate of the erased concept: unlearned model {pu:.2f} (after {su} LoRA steps), "
             f"never-learned control {pn:.2f} (after {sn}); the original draws it at {original_rate:.2f}.",
             f"Half of the original's rate ({level:.2f}) is first reached after "
             f"{fu if fu is not None else f'more than {last}'} steps by the unlearned model and after "
             f"{fn if fn is not None else f'more than {last}'} by the control."]
    if pu >= pn + 0.2:
        lines.append("The same MemoRa procedure (each model inverts and regenerates the same seed images itself, then "
                     "the same LoRA training) brings the concept back into the unlearned model and much less into a "
                     "model that never learned it: the unlearned model keeps a residual memory of the concept. (Part "
                     "of the gap is in the regenerated sets, which each model makes itself; that is how MemoRa "
                     "works.)")
    elif pn >= pu + 0.2:
        lines.append("The control recovers more than the unlearned model: no evidence of residual memory here.")
    else:
        lines.append("The two curves are within 0.2 of each other: no clear evidence of residual memory beyond what "
                     "the LoRA learns from the images themselves.")
    if fu is not None and fu <= quick:
        lines.append(f"The unlearned model recovers within {quick} LoRA steps: short-term forgetting in the paper's "
                     f"terms.")
    elif fu is not None:
        lines.append(f"Recovery, but only after more than {quick} steps: long-term forgetting in the paper's terms.")
    else:
        lines.append(f"No recovery to half the original's rate within {last} steps on this grid.")
    if pu < 0.7 * original_rate:
        lines.append(f"The recovered rate stays below the 70 % of the original's ({0.7 * original_rate:.2f}) that "
                     f"the micro world aimed for.")
    return " ".join(lines)


def plot(results: dict, original_rate: float, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for v, pts in results.items():
        xs = [max(p["lora_steps"], 1) for p in pts]
        c, label = ("tab:blue", "never-learned control") if v == "never_learned" else ("tab:red", f"unlearned ({v})")
        axes[0].plot(xs, [p["rate"] for p in pts], "o-", color=c, label=label)
        axes[1].plot(xs, [p["ssim"] for p in pts], "o-", color=c, label=label)
    axes[0].axhline(original_rate, color="gray", ls="--", lw=1, label="original model")
    for ax, title in zip(axes, ("detector rate of the erased concept", "SSIM to the original's images")):
        ax.set_xscale("log")
        ax.set_xlabel("MemoRa LoRA steps (0 plotted at 1)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.03, 1.03)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def contact_sheet(images, path: Path, cols: int = 11, scale: int = 3):

    from memora.micro import data

    arr = (images.clamp(0, 1) * 255).round().byte().cpu().numpy()
    data.grid(arr, cols=cols, scale=scale).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=None, help="ComfyUI base folder (default: a new temporary one)")
    ap.add_argument("--lora-steps", type=int, default=Settings.lora_steps)
    ap.add_argument("--variant", default="esd_x",
                    choices=["esd_x", "esd_u", "uce", "esd_u_deep", "esd_x_star_cross"],
                    help="the unlearned micro-world model to recover the erased concept from (default esd_x)")
    ap.add_argument("--curves", action="store_true", help="also run the residual-memory experiment")
    ap.add_argument("--curve-steps", default="0,10,25,50,100,200")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs", help="where the curve report goes")
    ap.add_argument("--eval-images", type=int, default=Settings.eval_images)
    ap.add_argument("--start-at-step", type=int, default=Settings.start_at_step,
                    help="inversion depth / regeneration start (of --steps)")
    ap.add_argument("--cfg", type=float, default=Settings.cfg, help="guidance of seed images, inversion, regeneration")
    ap.add_argument("--lora-lr", type=float, default=Settings.lora_lr)
    ap.add_argument("--refine", type=int, default=Settings.refine_iterations,
                    help="fixed-point refinement iterations of the inversion (0 = plain DDIM inversion)")
    args = ap.parse_args(argv)

    t_all = time.perf_counter()
    base = args.base or Path(tempfile.mkdtemp(prefix="memora-micro-"))
    comfy = boot(base)
    import folder_paths

    m = manifest()
    concept = m["erased_concept"]
    s = Settings(lora_steps=args.lora_steps, eval_images=args.eval_images, start_at_step=args.start_at_step,
                 cfg=args.cfg, lora_lr=args.lora_lr, refine_iterations=args.refine)
    pipe = Pipeline(s, concept, m["prompts"][concept], int(m["empty_latent_size"]))
    print(f"micro world: erased concept {concept!r}, prompt {pipe.prompt!r}; ComfyUI {comfy.version}, base {base}")

    # -- part 4: one recovery -------------------------------------------------------------------------------------
    un = run_point(comfy, pipe, args.variant, 0)
    rec = run_point(comfy, pipe, args.variant, s.lora_steps)
    lora_path = Path(folder_paths.get_folder_paths("loras")[0]) / rec["lora_file"]
    print(f"\nMemoRa recovery of {concept!r} ({s.eval_images} evaluation images, seed {s.eval_seed}, "
          f"DDIM {s.eval_steps} steps, cfg {s.eval_cfg}):")
    print(f"  detector rate  original {rec['rate_original']:.3f} | unlearned ({args.variant}) {un['rate']:.3f} | "
          f"recovered {rec['rate']:.3f}   (LoRA {s.lora_steps} steps)")
    print(f"  similarity to the original's images (SSIM / PSNR): unlearned {un['ssim']:.3f} / {un['psnr']:.1f} dB | "
          f"recovered {rec['ssim']:.3f} / {rec['psnr']:.1f} dB")
    print(f"  LoRA:    {lora_path}")
    print(f"  images:  {Path(folder_paths.get_output_directory()) / 'micro'}/")

    if args.curves:
        steps_list = [int(x) for x in args.curve_steps.split(",")]
        print(f"\nresidual-memory experiment: LoRA steps {steps_list}")
        res = curves(comfy, pipe, steps_list, variants=(args.variant, "never_learned"))
        img_dir = args.docs / "img"
        img_dir.mkdir(parents=True, exist_ok=True)
        plot(res, rec["rate_original"], img_dir / "micro-recovery.png")
        # sample sheets: seed images, regenerated set, evaluation images at the largest step count
        contact_sheet(rec["_images"]["seeds"], img_dir / "micro-seed-images.png", cols=6)
        contact_sheet(rec["_images"]["regen_img"], img_dir / "micro-regenerated-unlearned.png")
        rows = [rec["_images"]["orig_img"][:11], un["_images"]["eval_img"][:11]]
        for v in res:
            rows.append(res[v][-1]["_images"]["eval_img"][:11])
        import torch

        contact_sheet(torch.cat(rows), img_dir / "micro-evaluation.png")
        text = verdict(res, rec["rate_original"], quick=50)
        record = {"settings": asdict(s), "concept": concept, "prompt": pipe.prompt, "comfyui": comfy.version,
                  "original_rate": rec["rate_original"],
                  "curves": {v: [_public(p) for p in pts] for v, pts in res.items()}, "verdict": text,
                  "seconds": round(time.perf_counter() - t_all, 1)}
        (args.docs / "micro-recovery.json").write_text(json.dumps(record, indent=1))
        write_report(args.docs / "micro-recovery.md", record)
        print(f"\n{text}\nreport: {args.docs / 'micro-recovery.md'}  plot: {img_dir / 'micro-recovery.png'}")
    print(f"\ndone in {time.perf_counter() - t_all:.0f} s")
    return 0


def write_report(path: Path, rec: dict):
    s = rec["settings"]
    lines = [
        "# Micro world: recovery curves (generated)",
        "",
        f"Generated by `python scripts/micro_recovery.py --curves` (ComfyUI {rec['comfyui']}, "
        f"{rec['seconds']:.0f} s on this machine). Erased concept: **{rec['concept']}** (prompt "
        f"\"{rec['prompt']}\"). See docs/micro-world.md for the setting.",
        "",
        f"Pipeline per point: seed images from the original model (seed pairs {list(map(list, s['seed_pairs']))}, "
        f"DDIM {s['steps']} steps, cfg {s['cfg']}) -> DDIM inversion to step {s['start_at_step']} -> slerp "
        f"({s['slerp_intervals']} intervals, 33 latents) -> regeneration, all on the model under test -> MemoRa LoRA "
        f"Train (rank {s['lora_rank']}, alpha {s['lora_alpha']}, lr {s['lora_lr']} cosine, batch "
        f"{s['lora_batch']} x {s['lora_accumulation']}, seed {s['lora_seed']}, the given number of steps) -> "
        f"{s['eval_images']} evaluation images (seed {s['eval_seed']}, DDIM {s['eval_steps']} steps, cfg "
        f"{s['eval_cfg']}) -> detector rate (share of images whose top class is the erased concept) and SSIM to "
        f"the original model's images for the same prompt and seed.",
        "",
        f"Original model's rate: **{rec['original_rate']:.3f}**.",
        "",
        "| LoRA steps | " + " | ".join(f"{v} rate | {v} SSIM" for v in rec["curves"]) + " |",
        "|---|" + "---|---|" * len(rec["curves"]),
    ]
    variants = list(rec["curves"])
    for i, p in enumerate(rec["curves"][variants[0]]):
        cells = []
        for v in variants:
            q = rec["curves"][v][i]
            cells += [f"{q['rate']:.3f}", f"{q['ssim']:.3f}"]
        lines.append(f"| {p['lora_steps']} | " + " | ".join(cells) + " |")
    lines += ["", "![recovery curves](img/micro-recovery.png)", "", "Verdict: " + rec["verdict"], ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
