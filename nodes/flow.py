"""MemoRa on rectified-flow models (Flux dev / schnell, SD3-style discrete flow): inversion and regeneration of the
velocity ODE on the stock Euler sampler's sigma ladder. Slerp needs nothing new (MemoRa Slerp Latents: see
docs/flux.md). The maths is in ``memora.flow``."""

from __future__ import annotations

from comfy_api.latest import io

from memora import flow
from . import _flow_host, _host, _schema

SCHEDULERS = ["simple", "normal", "sgm_uniform", "beta"]
_LADDER = ("The sigma ladder is ComfyUI's own for the model (its model sampling object: the Flux shift, or what a "
           "ModelSamplingFlux / ModelSamplingSD3 node set), so SamplerCustomAdvanced with sampler euler, "
           "BasicScheduler (same scheduler and steps) split at start_at_step by SplitSigmas (low_sigmas) and "
           "DisableNoise continues the inverted latent exactly as MemoRa Flow Regenerate does.")


def _inputs():
    return [
        io.Model.Input("model", tooltip="A flow-matching model (Flux dev / schnell, ...): in MemoRa, the UNLEARNED one."),
        io.Conditioning.Input("positive", tooltip="The concept prompt's conditioning (Flux dev: with FluxGuidance "
                                                  "for the distilled guidance; without it ComfyUI uses 3.5)."),
        io.Conditioning.Input("negative", optional=True,
                              tooltip="Only for true CFG (true_cfg on, cfg > 1): the negative prompt's conditioning."),
        io.Latent.Input("latent", tooltip="Clean latents (16 channels for Flux)." ),
        io.Int.Input("steps", default=28, min=1, max=1000, tooltip="Number of Euler steps of the whole schedule."),
        io.Int.Input("start_at_step", default=8, min=1, max=999,
                     tooltip="The step where regeneration starts (MemoRa's 15 of 50 is 30% of the way: 8 of 28). "
                             "At least 1: step 0 is t = 1, pure noise."),
        io.Combo.Input("scheduler", options=SCHEDULERS, default="simple",
                       tooltip="ComfyUI's scheduler for the sigmas (Flux: simple, as BasicScheduler in its examples)."),
        io.Float.Input("cfg", default=1.0, min=1.0, max=100.0, step=0.1, round=0.01,
                       tooltip="1: one model call per step (Flux's way). Above 1: true classifier-free guidance "
                               "with the negative; on Flux it needs true_cfg on."),
        io.Boolean.Input("true_cfg", default=False,
                         tooltip="Run real CFG (cond and negative, two calls per step) on a guidance-distilled Flux "
                                 "model; off, cfg must be 1."),
    ]


def _ladder(model, positive, negative, steps, start_at_step, scheduler, cfg, true_cfg, what):
    kind = _flow_host.check_flow_model(model, what)
    _host.check_steps(steps, start_at_step)
    if scheduler not in SCHEDULERS:
        raise ValueError(f"{what}: scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    _flow_host.check_cfg(kind, float(cfg), bool(true_cfg), negative, what)
    _flow_host.check_flux_conditioning(model, kind, positive, what, "positive")
    if negative is not None:
        _flow_host.check_flux_conditioning(model, kind, negative, what, "negative")
    sigmas = _host.sampling_sigmas(model, steps, scheduler)[start_at_step:]
    flow.check_flow_ladder(sigmas)
    flow.check_start(float(sigmas[0]), start_at_step)
    return sigmas


def _run(model, positive, negative, cfg, samples, sigmas, algorithm):
    # cfg 1 without a negative: the positive stands in for it (ComfyUI's cfg-1 path never evaluates it).
    return _host.run_algorithm(model, positive, negative if negative is not None else positive, float(cfg), samples,
                               sigmas, algorithm)


class MemoRaFlowInversion(_schema.MemoRaNode):
    """Inversion of a flow-matching model's sampling ODE (Flux dev / schnell, SD3-style): clean latents -> the latents
    where Euler sampling at start_at_step of steps begins, each step the backward Euler step that the sampler's
    forward step undoes, with optional fixed-point refinement. The output LATENT is what ComfyUI's samplers read at
    that time (x_t / (1 - t)), so MemoRa Flow Regenerate and the stock SamplerCustomAdvanced (euler, noise disabled,
    BasicScheduler split at start_at_step) both continue it."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa Flow Inversion", inputs=[
            *_inputs(),
            io.Int.Input("refine_iterations", default=0, min=0, max=20,
                         tooltip="Extra fixed-point evaluations per step: 0 is plain Euler inversion; 2-4 make "
                                 "regeneration reproduce the input almost exactly. " + _LADDER),
        ], outputs=[_schema.latent_output("The inverted latents (x_t / (1 - t), as ComfyUI's samplers read them); "
                                          "the input LATENT's other keys are kept.")])

    @classmethod
    def execute(cls, model, positive, latent, steps, start_at_step, scheduler, cfg, true_cfg, refine_iterations,
                negative=None) -> io.NodeOutput:
        what = "MemoRa Flow Inversion"
        sigmas = _ladder(model, positive, negative, steps, start_at_step, scheduler, cfg, true_cfg, what)
        samples = _host.check_latent(model, latent.get("samples") if isinstance(latent, dict) else None, "latent")
        if refine_iterations < 0:
            raise ValueError(f"refine_iterations must be >= 0, got {refine_iterations}")
        progress = _host.StageProgress("inversion", len(sigmas) - 1)
        t0 = float(sigmas[0])

        def algorithm(velocity_fn, x0):
            return flow.to_latent(flow.invert(velocity_fn, x0, sigmas, refine_iterations, progress), t0)

        out = _run(model, positive, negative, cfg, samples, sigmas, algorithm)
        return io.NodeOutput({**latent, "samples": out})


class MemoRaFlowRegenerate(_schema.MemoRaNode):
    """Deterministic Euler sampling of a flow-matching model (Flux dev / schnell, SD3-style) from start_at_step of
    steps down to a clean latent: the regeneration step of MemoRa, batched (one model call per step for the whole
    batch; two with true CFG). Equal to the stock SamplerCustomAdvanced with sampler euler, DisableNoise and
    BasicScheduler's sigmas split at start_at_step (SplitSigmas, low_sigmas)."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa Flow Regenerate", inputs=_inputs(), outputs=[
            _schema.latent_output("Clean latents, ready for VAE Decode or training.")])

    @classmethod
    def execute(cls, model, positive, latent, steps, start_at_step, scheduler, cfg, true_cfg,
                negative=None) -> io.NodeOutput:
        what = "MemoRa Flow Regenerate"
        sigmas = _ladder(model, positive, negative, steps, start_at_step, scheduler, cfg, true_cfg, what)
        samples = _host.check_latent(model, latent.get("samples") if isinstance(latent, dict) else None, "latent")
        progress = _host.StageProgress("regeneration", len(sigmas) - 1)
        t0 = float(sigmas[0])

        def algorithm(velocity_fn, x):
            return flow.regenerate(velocity_fn, flow.from_latent(x, t0), sigmas, progress)

        out = _run(model, positive, negative, cfg, samples, sigmas, algorithm)
        return io.NodeOutput({**latent, "samples": out})


NODES = [MemoRaFlowInversion, MemoRaFlowRegenerate]
