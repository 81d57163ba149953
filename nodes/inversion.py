"""The inversion half of MemoRa: DDIM inversion, slerp of the inverted latents, regeneration."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from memora import ddim, schedule, slerp
from . import _host, _schema

SCHEDULES = ["exact", "reference"]

_SCHEDULE_TOOLTIP = (
    "exact: DDIM over ComfyUI's ddim_uniform sigmas (what KSamplerAdvanced with sampler ddim / scheduler "
    "ddim_uniform uses), so stock sampling continues the inverted latent correctly. reference: the reference "
    "implementation's arithmetic, quirks included (inversion kept one step less noisy than where regeneration "
    "starts; last step leaves sqrt(1 - alpha_bar_1) of noise), for parity studies.")


def _plan(model, positive, negative, steps: int, start_at_step: int, schedule_name: str, what: str):
    # Both schedules are DDIM on a discrete epsilon/v-prediction model (x = x0 + sigma * eps, alpha_bar from the
    # model's own sigma table): refuse flow-matching, EDM, x0 ... models instead of returning wrong latents.
    # v-prediction, zero-terminal SNR and SDXL's pooled/size/crop conditioning need nothing of their own: the
    # guider's denoised output comes from ComfyUI's model sampling object and conditioning pipeline.
    _host.check_model_kind(model, what)
    _host.check_steps(steps, start_at_step)
    if schedule_name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule_name!r}")
    if schedule_name == "reference":
        _host.check_reference_supported(model, what)
    _host.check_conditioning(model, positive, what, "positive")
    _host.check_conditioning(model, negative, what, "negative")
    sigmas = _host.sampling_sigmas(model, steps)[start_at_step:]
    plan = None
    if schedule_name == "reference":
        plan = schedule.reference_plan(_host.num_train_timesteps(model), steps, start_at_step)
    return sigmas, plan


def _common_inputs():
    return [
        io.Model.Input("model", tooltip="The model to invert with: in MemoRa, the UNLEARNED model."),
        io.Conditioning.Input("positive", tooltip="The concept prompt's conditioning (e.g. 'a photo of the parachute')."),
        io.Conditioning.Input("negative", tooltip="Negative conditioning for classifier-free guidance (MemoRa: the empty prompt)."),
    ]


def _step_inputs():
    return [
        io.Int.Input("steps", default=50, min=1, max=1000,
                     tooltip="Number of DDIM sampling steps the latent is meant for (the reference uses 50)."),
        io.Int.Input("start_at_step", default=15, min=0, max=999,
                     tooltip="The sampling step where regeneration starts; must be smaller than steps (MemoRa: 15)."),
        io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale used for every model call (MemoRa: 7.5)."),
    ]


class MemoRaDDIMInversion(_schema.MemoRaNode):
    """Deterministic DDIM inversion with classifier-free guidance: clean VAE latents -> the noisy latents where
    sampling at start_at_step of steps begins. The output continues correctly through MemoRa Regenerate, and
    (schedule 'exact') through the stock KSamplerAdvanced with add_noise disable, the same steps and start_at_step,
    sampler ddim, scheduler ddim_uniform. The whole batch and its CFG pair go through the model in one call per
    step."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa DDIM Inversion", inputs=[
            *_common_inputs(),
            io.Latent.Input("latent", tooltip="Clean VAE latents of the concept images (any batch size)."),
            *_step_inputs(),
            io.Int.Input("refine_iterations", default=0, min=0, max=20,
                         tooltip="Extra fixed-point evaluations per step (exact schedule): 0 is classic DDIM "
                                 "inversion; 2-3 make regeneration reproduce the input almost exactly."),
            io.Combo.Input("schedule", options=SCHEDULES, default="exact", tooltip=_SCHEDULE_TOOLTIP),
        ], outputs=[_schema.latent_output("The inverted (noisy) latents; the input LATENT's other keys are kept.")])

    @classmethod
    def execute(cls, model, positive, negative, latent, steps, start_at_step, cfg, refine_iterations,
                schedule) -> io.NodeOutput:
        sigmas, plan = _plan(model, positive, negative, steps, start_at_step, schedule, "MemoRa DDIM Inversion")
        samples = _host.check_latent(model, latent.get("samples") if isinstance(latent, dict) else None, "latent")
        if refine_iterations < 0:
            raise ValueError(f"refine_iterations must be >= 0, got {refine_iterations}")
        if plan is None:
            progress = _host.StageProgress("inversion", (len(sigmas) - 1))

            def algorithm(eps_fn, x0):
                return ddim.invert(eps_fn, x0, sigmas, refine_iterations, progress)
        else:
            ab = _host.alphas_cumprod(model)
            progress = _host.StageProgress("inversion", len(plan.inversion_targets))

            def algorithm(eps_fn, x0):
                x_vp = ddim.reference_invert(eps_fn, x0, ab, plan, progress)
                # The reference feeds this latent to a VP sampler at start_timestep: in VE coordinates that is
                # x_vp / sqrt(ab[start]); Regenerate (and KSamplerAdvanced) then continue exactly as the reference.
                return x_vp / float(ab[plan.start_timestep]) ** 0.5

        out = _host.run_algorithm(model, positive, negative, cfg, samples, sigmas, algorithm)
        return io.NodeOutput({**latent, "samples": out})


class MemoRaRegenerate(_schema.MemoRaNode):
    """Deterministic DDIM (eta 0) sampling with classifier-free guidance from start_at_step of steps down to a clean
    latent: the regeneration step of MemoRa, batched (one model call per step for the whole batch and its CFG pair).
    With schedule 'exact' it equals the stock KSamplerAdvanced (add_noise disable, sampler ddim, scheduler
    ddim_uniform)."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa Regenerate", inputs=[
            *_common_inputs(),
            io.Latent.Input("latent", tooltip="Inverted latents (e.g. from MemoRa DDIM Inversion or Slerp Latents)."),
            *_step_inputs(),
            io.Combo.Input("schedule", options=SCHEDULES, default="exact", tooltip=_SCHEDULE_TOOLTIP),
        ], outputs=[_schema.latent_output("Clean latents, ready for VAE Decode or training.")])

    @classmethod
    def execute(cls, model, positive, negative, latent, steps, start_at_step, cfg, schedule) -> io.NodeOutput:
        sigmas, plan = _plan(model, positive, negative, steps, start_at_step, schedule, "MemoRa Regenerate")
        samples = _host.check_latent(model, latent.get("samples") if isinstance(latent, dict) else None, "latent")
        if plan is None:
            progress = _host.StageProgress("regeneration", len(sigmas) - 1)

            def algorithm(eps_fn, x):
                return ddim.regenerate(eps_fn, x, sigmas, progress)
        else:
            ab = _host.alphas_cumprod(model)
            progress = _host.StageProgress("regeneration", len(plan.regeneration))

            def algorithm(eps_fn, x):
                x_vp = x * float(ab[plan.start_timestep]) ** 0.5
                return ddim.reference_regenerate(eps_fn, x_vp, ab, plan, progress)

        out = _host.run_algorithm(model, positive, negative, cfg, samples, sigmas, algorithm)
        return io.NodeOutput({**latent, "samples": out})


def _interp_mask(mask_a, mask_b, pts, batch):
    """Noise masks follow their latents: linear interpolation between the pair's masks (they are soft weights)."""
    if mask_a is None and mask_b is None:
        return None
    ma = mask_a if mask_a is not None else mask_b
    mb = mask_b if mask_b is not None else mask_a
    ma = ma.detach().to(torch.float32)
    mb = mb.detach().to(torch.float32)
    if ma.shape != mb.shape:
        raise ValueError(f"noise_mask shapes differ between latent_a {tuple(ma.shape)} and latent_b {tuple(mb.shape)}")

    def per_item(m):
        if m.dim() == 2:
            m = m.unsqueeze(0)
        if m.shape[0] == 1 and batch > 1:
            m = m.expand(batch, *m.shape[1:])
        if m.shape[0] != batch:
            raise ValueError(f"noise_mask has {m.shape[0]} items but the latent batch has {batch}")
        return m

    ma, mb = per_item(ma), per_item(mb)
    t = torch.tensor(pts, dtype=torch.float32).view(1, -1, *([1] * (ma.dim() - 1)))
    out = (1 - t) * ma.unsqueeze(1) + t * mb.unsqueeze(1)
    return out.reshape(batch * len(pts), *ma.shape[1:])


class MemoRaSlerpLatents(_schema.MemoRaNode):
    """Spherical interpolation between item i of latent_a and item i of latent_b (never across pairs), at t = k /
    intervals. Output is pair-major: 3 pairs x 11 points = 33 latents. Computed in fp32 with the cosine clamped and
    a linear fallback for (anti)parallel inputs, so identical latents give finite results; endpoints are returned
    exactly. Unlike the core LatentInterpolate, this is a true slerp over the whole latent."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa Slerp Latents", inputs=[
            io.Latent.Input("latent_a", tooltip="First latent of each pair (batch of B)."),
            io.Latent.Input("latent_b", tooltip="Second latent of each pair (same shape as latent_a)."),
            io.Int.Input("intervals", default=10, min=1, max=1000,
                         tooltip="Number of intervals between the two latents of a pair (MemoRa: 10)."),
            io.Boolean.Input("include_endpoints", default=True,
                             tooltip="Include t = 0 and t = 1 (the inputs themselves): 11 points per pair for "
                                     "intervals 10; without them, 9."),
        ], outputs=[_schema.latent_output("B x points latents, pair-major; noise_mask interpolated alongside.")])

    @classmethod
    def execute(cls, latent_a, latent_b, intervals, include_endpoints) -> io.NodeOutput:
        a = latent_a.get("samples") if isinstance(latent_a, dict) else None
        b = latent_b.get("samples") if isinstance(latent_b, dict) else None
        for name, s in (("latent_a", a), ("latent_b", b)):
            if not isinstance(s, torch.Tensor):
                raise ValueError(f"{name}: expected a LATENT with a 'samples' tensor")
            if s.dim() < 2 or s.shape[0] == 0:
                raise ValueError(f"{name}: the batch is empty")
            if not torch.isfinite(s).all():
                raise ValueError(f"{name}: contains non-finite values (NaN or inf)")
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"latent_a has {a.shape[0]} latents but latent_b has {b.shape[0]}: item i of a pairs "
                             f"with item i of b, so the batch sizes must match")
        if a.shape != b.shape:
            raise ValueError(f"latent_a and latent_b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        pts = slerp.interpolation_points(intervals, include_endpoints)
        out = {k: v for k, v in latent_a.items() if k not in ("samples", "noise_mask", "batch_index")}
        out["samples"] = slerp.slerp_pairs(a, b, intervals, include_endpoints)
        mask = _interp_mask(latent_a.get("noise_mask"), latent_b.get("noise_mask"), pts, a.shape[0])
        if mask is not None:
            out["noise_mask"] = mask
        if "batch_index" in latent_a:
            # New items: keep ordering and uniqueness relative to the source batch positions.
            n = len(pts)
            out["batch_index"] = [int(i) * n + j for i in latent_a["batch_index"] for j in range(n)]
        return io.NodeOutput(out)


NODES = [MemoRaDDIMInversion, MemoRaSlerpLatents, MemoRaRegenerate]
