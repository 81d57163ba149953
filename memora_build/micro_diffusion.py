"""Build-only: the micro world's training and sampling loops, over an abstract noise predictor (torch only).

A noise predictor is ``unet(x_vp, t, context) -> eps`` in Stable Diffusion's own (variance-preserving) convention:
``x_vp = sqrt(ab_t) * x0 + sqrt(1 - ab_t) * eps`` with ``x0`` the VAE latent times 0.18215, ``t`` a float tensor of
timesteps in 0..999 and ``context`` the text encoder's [B, 77, C] hidden states. This is exactly what an ldm
``UNetModel.forward(x, timesteps, context=...)`` computes, so the build script (scripts/build_micro_world.py, the
only user of this module) passes ComfyUI's UNet in directly and ComfyUI later samples the same network through its
own model wrapper.

- ``train_eps``: the standard DDPM objective (MSE between predicted and true noise, t uniform), with caption dropout
  so classifier-free guidance works, AdamW, a cosine schedule with warm-up, and an EMA of the weights.
- ``ddim_sample``: deterministic DDIM (eta 0) with classifier-free guidance, "leading" timesteps with offset 1
  (what ComfyUI's ddim sampler with the ddim_uniform scheduler does).
- ``esd_train``: Erased Stable Diffusion ("Erasing Concepts from Diffusion Models", Gandikota et al. 2023): the
  fine-tuned model, conditioned on the concept, is trained to predict the frozen original's negatively guided noise
  ``eps_orig(x, t, "") - eta * (eps_orig(x, t, c) - eps_orig(x, t, ""))`` on states ``x`` drawn from its own
  concept-conditioned sampling trajectories.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from memora.schedule import leading_timesteps, scaled_linear_alphas_cumprod

Unet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LATENT_SCALE = 0.18215  # SD1.x latent_format scale factor: the UNet sees VAE latents times this
NUM_TIMESTEPS = 1000


def alphas_cumprod() -> torch.Tensor:
    return scaled_linear_alphas_cumprod(NUM_TIMESTEPS).to(torch.float32)


@dataclass
class TrainLog:
    steps: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    seconds: float = 0.0

    def add(self, step: int, loss: float):
        self.steps.append(step)
        self.losses.append(loss)

    def summary(self, every: int = 1) -> list:
        return [[s, round(v, 5)] for s, v in zip(self.steps[::every], self.losses[::every])]


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


class EMA:
    """Exponential moving average of parameters (the sampled model is the EMA one, as in most diffusion training)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.nn.Parameter]):
        for s, p in zip(self.shadow, params):
            p.copy_(s)


def train_eps(unet: torch.nn.Module, latents: torch.Tensor, labels: torch.Tensor, contexts: torch.Tensor,
              uncond: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int, p_uncond: float = 0.1,
              warmup: int = 50, weight_decay: float = 0.0, ema_decay: float = 0.999, grad_clip: float = 1.0,
              min_snr_gamma: Optional[float] = None, log_every: int = 25,
              progress: Optional[Callable[[int, int, float], None]] = None,
              snapshot: Optional[Callable[[int, "EMA"], None]] = None, snapshot_every: int = 0,
              balanced: bool = False, guidance_fold: Optional[torch.Tensor] = None) -> TrainLog:
    """Train ``unet`` (in place; its weights end as the EMA weights) to predict noise on ``latents``.

    latents: [N, 4, h, w] VAE latents (unscaled); labels: [N] indices into ``contexts`` ([K, 77, C] text embeddings
    of the captions); uncond: [77, C] the empty prompt's embedding, used with probability ``p_uncond``. With
    ``balanced`` every batch holds the classes present in ``labels`` in equal shares (up to one image), cycling
    which classes get the remainder; otherwise images are drawn uniformly.

    ``guidance_fold`` ([K] weights, one per context; 1 = plain): for an image of a class with weight w != 1 whose
    caption was kept, the *guided* prediction ``eps(x,t,"") + w (eps(x,t,c) - eps(x,t,""))`` is what is fitted to the
    noise, the unconditional prediction taken without a gradient. The conditional branch then learns 1/w of the
    conditional-unconditional difference, so that sampling at cfg s draws that class as a plain model does at s / w
    (the guidance scale folded into the weights, as guidance distillation does the other way round: Meng et al., "On
    Distillation of Guided Diffusion Models", CVPR 2023). The unconditional branch learns as before. The fixed
    point is the same whatever the rows' weights, but a folded row's gradient on eps(x,t,c) is w^2 times a plain
    row's (its squared error is taken on a prediction that moves w times as fast), so in a mixed batch the folded
    classes take a larger share of each (clipped) step."""
    g = torch.Generator().manual_seed(seed)
    draw = _balanced_sampler(labels, batch, g) if balanced else None
    ab = alphas_cumprod()
    x0_all = latents.float() * LATENT_SCALE
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    ema = EMA(params, ema_decay)
    log = TrainLog()
    start = time.perf_counter()
    unet.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        idx = draw(step) if draw is not None else torch.randint(0, x0_all.shape[0], (batch,), generator=g)
        x0 = x0_all[idx]
        ctx = contexts[labels[idx]]
        drop = torch.rand(batch, generator=g) < p_uncond
        ctx = torch.where(drop[:, None, None], uncond[None].expand_as(ctx), ctx)
        t = torch.randint(0, NUM_TIMESTEPS, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, t.float(), ctx)
        if guidance_fold is not None:
            w = guidance_fold[labels[idx]]
            fold = (w != 1) & ~drop
            if fold.any():
                with torch.no_grad():
                    eps_u = unet(xt[fold], t[fold].float(), uncond[None].expand(int(fold.sum()), *uncond.shape))
                pred = pred.clone()
                pred[fold] = eps_u + w[fold].view(-1, 1, 1, 1) * (pred[fold] - eps_u)
        err = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if min_snr_gamma:
            # Min-SNR-gamma weighting (Hang et al. 2023) for an eps model: min(SNR, gamma) / SNR
            snr = (a / (1 - a)).view(-1)
            err = err * snr.clamp(max=min_snr_gamma) / snr
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        ema.update(step)
        if step % log_every == 0 or step == steps - 1:
            log.add(step, float(loss.detach()))
            if progress is not None:
                progress(step, steps, float(loss.detach()))
        if snapshot is not None and snapshot_every and (step + 1) % snapshot_every == 0:
            snapshot(step + 1, ema)
    ema.copy_to(params)
    unet.eval()
    log.seconds = time.perf_counter() - start
    return log


def _balanced_sampler(labels: torch.Tensor, batch: int, g: torch.Generator) -> Callable[[int], torch.Tensor]:
    """Class-balanced batches: ``draw(step)`` gives ``batch`` indices into ``labels``, cycling through the classes
    present so that each gets ``batch // K`` or one more image, each drawn uniformly (with replacement) in its class."""
    labels = torch.as_tensor(labels).long()
    order = torch.argsort(labels, stable=True)
    classes = torch.unique(labels)
    counts = torch.stack([(labels == c).sum() for c in classes])
    starts = torch.cumsum(counts, 0) - counts

    def draw(step: int) -> torch.Tensor:
        k = (torch.arange(batch) + step * batch) % len(classes)
        within = (torch.rand(batch, generator=g) * counts[k]).long().clamp(max=counts[k] - 1)
        return order[starts[k] + within]

    return draw


@torch.no_grad()
def ddim_sample(unet: Unet, noise: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor, *, cfg: float,
                steps: int, start_step: int = 0, x_start: Optional[torch.Tensor] = None,
                record: bool = False):
    """Deterministic DDIM with classifier-free guidance from pure noise (or from ``x_start``, a VP latent at
    timestep ``leading_timesteps(...)[start_step]``); returns the clean scaled latent (``x0 * 0.18215``), and with
    ``record`` also the list of (timestep, x_vp) states visited before each step."""
    ab = alphas_cumprod()
    ts = leading_timesteps(NUM_TIMESTEPS, steps)
    x = noise if x_start is None else x_start
    n = x.shape[0]
    ctx = context.expand(n, *context.shape[-2:]) if context.dim() == 2 or context.shape[0] == 1 else context
    unc = uncond.expand(n, *uncond.shape[-2:])
    states = []
    for i in range(start_step, len(ts)):
        t = ts[i]
        if record:
            states.append((t, x.clone()))
        tt = torch.full((2 * n,), float(t))
        e = unet(torch.cat([x, x]), tt, torch.cat([ctx, unc]))
        e_c, e_u = e.chunk(2)
        eps = e_u + cfg * (e_c - e_u)
        a_t = ab[t]
        a_prev = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return (x, states) if record else x


def trainable_for_esd(unet: torch.nn.Module, method: str) -> list[str]:
    """Parameter names an ESD variant fine-tunes: ``x`` (ESD-x) every cross-attention (attn2) parameter; ``u``
    (ESD-u) every other parameter except the time embedding and the output layer (the original recipe)."""
    names = []
    for name, _ in unet.named_parameters():
        if method == "x":
            if "attn2" in name:
                names.append(name)
        elif method == "u":
            if "attn2" in name or name.startswith("out.") or "time_embed" in name:
                continue
            names.append(name)
        else:
            raise ValueError(f"ESD method must be 'x' or 'u', got {method!r}")
    return names


def esd_train(unet: torch.nn.Module, concept_ctx: torch.Tensor, uncond: torch.Tensor, *, method: str = "x",
              steps: int, batch: int, lr: float, seed: int, negative_guidance: float = 1.0,
              sample_steps: int = 20, sample_cfg: float = 3.0, pool: int = 64, refresh_every: int = 25,
              preserve_ctx: Optional[torch.Tensor] = None, preserve_weight: float = 0.0,
              log_every: int = 25, progress: Optional[Callable[[int, int, float], None]] = None) -> TrainLog:
    """ESD fine-tune of ``unet`` in place (a frozen copy plays the original model).

    The states ``x_t`` come from concept-conditioned DDIM trajectories (``sample_steps`` steps, guidance
    ``sample_cfg``) of the model being fine-tuned, as in the paper; to amortise sampling, a pool of ``pool``
    trajectories is re-sampled from the current model every ``refresh_every`` updates, and each update draws
    ``batch`` (state, timestep) pairs from it, with the timestep jittered inside its DDIM stride like the reference
    (t_enc_ddpm). ``concept_ctx`` is one prompt's [77, C] embedding or several ([K, 77, C]: several concepts erased
    at once, the pool's trajectories split evenly between them, each state trained towards its own concept's
    target). ``preserve_ctx`` ([M, 77, C], optional) adds ``preserve_weight`` x MSE(eps(x, t, c_m),
    eps_orig(x, t, c_m)) for other prompts on the same states (0 = plain ESD)."""
    g = torch.Generator().manual_seed(seed)
    orig = copy.deepcopy(unet).eval()
    for p in orig.parameters():
        p.requires_grad_(False)
    names = set(trainable_for_esd(unet, method))
    params = []
    for name, p in unet.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    stride = NUM_TIMESTEPS // sample_steps
    c = concept_ctx.reshape(-1, *concept_ctx.shape[-2:])
    u = uncond.reshape(1, *uncond.shape[-2:])
    pool_concept = torch.arange(pool) % c.shape[0]  # trajectory -> which erased concept it draws
    log = TrainLog()
    start = time.perf_counter()
    states_x = states_t = None
    for step in range(steps):
        if step % refresh_every == 0:
            unet.eval()
            noise = torch.randn((pool, 4) + tuple(_latent_hw(unet)), generator=g)
            _, states = ddim_sample(unet, noise, c[pool_concept], u, cfg=sample_cfg, steps=sample_steps, record=True)
            states_x = torch.stack([s for _, s in states])  # [S, pool, ...]
            states_t = torch.tensor([t for t, _ in states])
            unet.train()
        si = torch.randint(0, states_x.shape[0], (batch,), generator=g)
        pi = torch.randint(0, pool, (batch,), generator=g)
        x = states_x[si, pi]
        # like the reference (t_enc_ddpm), the training timestep is drawn uniformly within the state's DDIM stride
        jitter = torch.randint(0, stride, (batch,), generator=g) - stride // 2
        t = (states_t[si] + jitter).clamp(0, NUM_TIMESTEPS - 1).float()
        cb = c[pool_concept[pi]]
        with torch.no_grad():
            e = orig(torch.cat([x, x]), torch.cat([t, t]), torch.cat([u.expand(batch, -1, -1), cb]))
            e0, ep = e.chunk(2)
            target = e0 - negative_guidance * (ep - e0)
        pred = unet(x, t, cb)
        loss = torch.nn.functional.mse_loss(pred, target)
        if preserve_ctx is not None and preserve_weight > 0:
            k = torch.randint(0, preserve_ctx.shape[0], (batch,), generator=g)
            pc = preserve_ctx[k]
            with torch.no_grad():
                keep = orig(x, t, pc)
            loss = loss + preserve_weight * torch.nn.functional.mse_loss(unet(x, t, pc), keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            log.add(step, float(loss.detach()))
            if progress is not None:
                progress(step, steps, float(loss.detach()))
    for p in unet.parameters():
        p.requires_grad_(True)
    unet.eval()
    log.seconds = time.perf_counter() - start
    return log


def _latent_hw(unet) -> Sequence[int]:
    hw = getattr(unet, "micro_latent_hw", None)
    if hw is None:
        raise ValueError("set unet.micro_latent_hw = (h, w) (the latent size to sample) before esd_train")
    return hw
