"""MemoRa LoRA Train: the reference recipe, in-process, on the MODEL it is given."""

from __future__ import annotations

import dataclasses
import json

from comfy_api.latest import io

import memora
from memora import contracts
from memora.lora import conditioning as _conditioning
from memora.lora import denoiser as _precision
from memora.lora import fingerprint, formats
from memora.lora import flow as _flow
from memora.lora import metadata as _metadata
from memora.lora import recipe as _recipe
from memora.lora import train as _train
from memora.lora.train import V_PREDICTION
from . import _host, _lora_host, _schema
from . import _train_host as _th
from . import _train_model as _tm

_TARGETS_TOOLTIP = (
    "attention: to_q, to_k, to_v, to_out.0 of every UNet attention (the reference; SD1.x: 128 layers, 797,184 "
    "parameters at rank 4); attention+feedforward: also ff.net.0.proj and ff.net.2; all linear+conv: every Linear and "
    "Conv layer of the UNet.")


def _inputs():
    return [
        io.Model.Input("model", tooltip="The model to recover the concept in: in MemoRa, the UNLEARNED model. It is "
                                        "not modified."),
        io.Latent.Input("latents", tooltip="The training set: clean VAE latents of the concept images (e.g. the "
                                           "regenerated batch from MemoRa Regenerate). Prepared once."),
        io.Conditioning.Input("positive", tooltip="The concept prompt's conditioning (e.g. CLIPTextEncode of 'a photo "
                                                  "of the parachute'), used for every training sample."),
        io.Int.Input("steps", default=500, min=1, max=100000,
                     tooltip="Optimizer updates (the reference: 500). Each update sees batch_size x "
                             "gradient_accumulation samples."),
        io.Int.Input("rank", default=4, min=1, max=256, tooltip="LoRA rank (the reference: 4)."),
        io.Float.Input("alpha", default=4.0, min=0.001, max=1024.0, step=0.5,
                       tooltip="LoRA alpha; the delta is scaled by alpha / rank (the reference: 4, scale 1)."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-5, round=1e-8,
                       tooltip="AdamW peak learning rate (the reference: 1e-4; betas 0.9/0.999, weight decay 1e-2, "
                               "eps 1e-8)."),
        io.Combo.Input("lr_schedule", options=list(_recipe.LR_SCHEDULES), default=_recipe.COSINE,
                       tooltip="cosine: from learning_rate to 0 over the updates, no warm-up (the reference); "
                               "constant: learning_rate throughout."),
        io.Int.Input("batch_size", default=1, min=1, max=1024,
                     tooltip="Samples per forward pass (the reference: 1). Larger uses more memory and is faster."),
        io.Int.Input("gradient_accumulation", default=4, min=1, max=1024,
                     tooltip="Forward passes per update; the update's gradient is the mean over batch_size x "
                             "gradient_accumulation samples (the reference: 1 x 4 = 4)."),
        io.Combo.Input("targets", options=list(_recipe.TARGETS), default=_recipe.ATTENTION, tooltip=_TARGETS_TOOLTIP),
        io.Boolean.Input("random_flip", default=True,
                         tooltip="Flip each sample horizontally with probability 0.5 (the reference). The flipped "
                                 "latents are prepared once."),
        io.Combo.Input("precision", options=list(_precision.PRECISIONS), default="auto",
                       tooltip="Precision of the frozen weights and the forward pass; LoRA parameters are always fp32. "
                               "auto: what ComfyUI runs this model in (fp32 on the CPU, usually fp16 on a GPU); fp16 "
                               "uses dynamic loss scaling."),
        io.Boolean.Input("gradient_checkpointing", default=False,
                         tooltip="Recompute the UNet blocks in the backward pass instead of keeping their "
                                 "activations: less memory, slower (one more forward pass per step). Same result."),
        io.Int.Input("seed", default=2024, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                     tooltip="Seeds the one generator behind every random draw: LoRA init, sample order, flips, "
                             "timesteps, noise (the reference: 2024)."),
        _schema.save_name_input("memora/recovered", "File prefix under models/loras (subfolders with '/'); the file "
                                                    "is <save_name>_<counter>_.safetensors and never overwrites one. "
                                                    "Empty: do not save."),
        io.String.Input("snapshot_steps", default="", optional=True,
                        tooltip="Also save the LoRA after these update counts, e.g. '25,50,100,200' (each <= steps): "
                                "one training gives every point of a recovery curve. Files "
                                "<save_name>_step<N>_<counter>_.safetensors next to the final one, listed before it "
                                "in the node's LoRA list; each is bit for bit the LoRA of a separate N-update run "
                                "with the same seed and schedule_steps = this run's schedule length. Empty: none."),
        io.Int.Input("schedule_steps", default=0, min=0, max=100000, optional=True,
                     tooltip="Length of the learning-rate schedule in updates (cosine decays to 0 over it); 0: "
                             "steps. Set it to a longer run's length to reproduce that run's first `steps` updates "
                             "exactly (its snapshot at `steps`)."),
    ]


# ModelSpec's implementation for files in the original (SGM) module names, as kohya sd-scripts writes it for SDXL
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def kohya_base_model_tags(model, prediction_type: str) -> dict[str, str]:
    """kohya sd-scripts' base-model keys for the MODEL's architecture (``ss_base_model_version``: ``sd_v1``,
    ``sd_v2``, ``sd_v2_768_v``, ``sdxl_base_v1-0``; ``ss_v2``), which LoRA managers read to sort LoRAs by base
    model; none for other architectures (the SDXL refiner, SSD-1B and the like included: their own ComfyUI class)."""
    family = _host.model_family(model)
    version = {"SD15": "sd_v1", "SDXL": "sdxl_base_v1-0",
               "SD20": "sd_v2_768_v" if prediction_type == V_PREDICTION else "sd_v2"}.get(family)
    if version is None:
        return {}
    return {"ss_base_model_version": version, "ss_v2": str(family == "SD20")}


FLUX_FORMAT = "diffusers-flux"


def flux_modelspec(model, metadata: dict, *, title: str, samples) -> dict[str, str]:
    """ModelSpec keys of a Flux LoRA (architecture ``flux-1-dev/lora`` or ``flux-1-schnell/lora``, BFL's
    implementation), which LoRA managers read to sort LoRAs by base model; none for other models."""
    if not _lora_host.is_flux(model):
        return {}
    variant = "schnell" if _host.model_family(model) == "FluxSchnell" else "dev"
    height, width = (int(s) * 8 for s in samples.shape[-2:])
    return {"modelspec.sai_model_spec": _metadata.MODELSPEC_VERSION,
            "modelspec.architecture": f"flux-1-{variant}/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux", "modelspec.title": title,
            "modelspec.date": _metadata.creation_date(), "modelspec.resolution": f"{width}x{height}",
            **({"modelspec.trigger_phrase": metadata["memora.concept"]} if metadata.get("memora.concept") else {})}


def lora_metadata(recipe: _recipe.LoRARecipe, run: _th.TrainingRun, concept: str, samples, lora_sd,
                  title: str, sgm_names: bool = False) -> dict:
    """safetensors metadata (str -> str, ``memora.lora.metadata``'s dialect): no paths, and no time finer than the
    day, so the same training on the same day gives the same file bytes. ``sgm_names``: the file's UNet layers are
    named by the original (SGM) modules (SDXL), so ModelSpec's implementation is Stability AI's, as sd-scripts
    writes it."""
    res = run.result
    extra = {
        "memora.recipe": recipe.to_json(),
        "memora.steps": str(recipe.steps),
        "memora.seed": str(recipe.seed),
        "memora.base_model_hash": run.base_model_hash,
        "memora.training_latents": json.dumps({"shape": list(samples.shape), "hash": fingerprint.tensor_hash(samples)}),
        "memora.precision": _precision.dtype_name(run.dtype),
        "memora.prediction_type": run.prediction_type,
        "memora.trainable_parameters": str(run.trainable_parameters),
        "memora.final_loss": repr(res.losses[-1]) if res.losses else "",
        "memora.micro_steps": str(res.micro_steps),
    }
    height, width = (int(s) * 8 for s in samples.shape[-2:])
    flow = run.prediction_type == _flow.FLOW
    summary = formats.summarize(formats.to_kohya(lora_sd) if flow else lora_sd)
    meta = _metadata.lora_metadata(lora_sd, summary, version=memora.__version__, title=title,
                                   concept=concept, prediction_type=run.prediction_type,
                                   resolution=f"{width}x{height}", extra=extra)
    if flow:  # a diffusers/PEFT Flux file (no alpha keys: the scale is folded into lora_B), not an sd-scripts one
        meta["memora.format"] = FLUX_FORMAT
        meta.pop("ss_network_module", None)
    if sgm_names and "modelspec.implementation" in meta:
        meta["modelspec.implementation"] = SGM_IMPLEMENTATION
    return meta


class MemoRaLoRATrain(_schema.MemoRaNode):
    """Trains a LoRA on the given (unlearned) model with the MemoRa recipe: epsilon-prediction MSE (the model's own
    velocity objective for v-prediction models) with t uniform over the training timesteps, LoRA down ~ N(0,
    (1/rank)^2) and up = 0 on the attention projections, AdamW with a cosine schedule to 0 and gradient norm
    clipping at 1.0, random horizontal flips, every random draw from one seeded generator (bit-identical results on
    the CPU for the same inputs). The input model is never modified; the queue's cancel stops within one step and
    writes nothing. The LoRA is saved in kohya format (loads in LoraLoader and diffusers) under
    models/loras/<save_name>_<counter>_.safetensors, never overwriting a file. With snapshot_steps, the LoRA is also
    saved after each of those update counts (<save_name>_step<N>_<counter>_.safetensors): one training gives every
    point of a recovery curve, each bit for bit the LoRA of a separate N-update run with schedule_steps set to this
    run's length."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa LoRA Train", inputs=_inputs(), outputs=[
            io.Model.Output(display_name="model",
                            tooltip="The input model with the trained LoRA applied at strength 1 (a patched clone)."),
            _schema.lora_output("The trained LoRA in kohya format (for LoraModelLoader, MemoRa nodes, Save LoRA)."),
            io.Custom("LOSS_MAP").Output(display_name="loss",
                                         tooltip="Per-update training loss {'loss': [...], 'lr': [...]}; plug "
                                                 "into the core Plot Loss Graph node."),
            _schema.filename_output("The saved file relative to the loras folder, as LoraLoader lists it (empty "
                                    "when save_name is empty)."),
        ], hidden=[io.Hidden.unique_id, io.Hidden.prompt], is_output_node=True)

    @classmethod
    def execute(cls, model, latents, positive, steps, rank, alpha, learning_rate, lr_schedule, batch_size,
                gradient_accumulation, targets, random_flip, precision, gradient_checkpointing, seed,
                save_name, snapshot_steps="", schedule_steps=0) -> io.NodeOutput:
        # -- every check before any work --
        samples = _host.check_latent(model, latents.get("samples") if isinstance(latents, dict) else None,
                                     "latents")
        _conditioning.check_training_conditioning(positive)
        recipe = _recipe.LoRARecipe(steps=steps, rank=rank, alpha=alpha, learning_rate=learning_rate,
                                    lr_schedule=lr_schedule, batch_size=batch_size,
                                    gradient_accumulation=gradient_accumulation, targets=targets,
                                    random_flip=bool(random_flip), seed=seed,
                                    schedule_steps=schedule_steps).validate()
        snapshots = _recipe.parse_snapshot_steps(snapshot_steps, recipe.steps)
        _tm.prediction_type(model)
        _tm.target_layers(model, targets)
        _tm.check_model_conditioning(model, positive)
        _tm.training_dtype(model, precision)
        save = _lora_host.check_save_name(save_name) is not None
        if snapshots and not save:
            raise ValueError(f"snapshot_steps {snapshot_steps!r} needs a save_name: snapshots are saved as files "
                             f"(<save_name>_step<N>_<counter>_.safetensors); give a save_name or empty "
                             f"snapshot_steps")
        hidden = getattr(cls, "hidden", None)
        node_id = getattr(hidden, "unique_id", None)
        concept = _conditioning.concept_from_prompt(getattr(hidden, "prompt", None), node_id)

        # -- training (the input model is never modified; cancel raises out of here, nothing written) --
        progress = _host.TrainProgress(recipe.steps, node_id)
        run = _th.train_on_model(model, positive, samples, recipe, precision, bool(gradient_checkpointing),
                                 on_update=progress.update, on_micro_step=progress.micro_step,
                                 snapshot_steps=snapshots)
        lora_sd = _lora_host.layers_to_kohya(model, run.layers)
        out_model, _report = _lora_host.apply_lora(model, lora_sd, 1.0)

        filename, saved = "", []
        if save:
            for n in snapshots:  # first the snapshots, in update order; the final LoRA last (the editor shows it)
                saved.append(save_trained(model, snapshot_recipe(recipe, n), snapshot_run(run, n), concept, samples,
                                          _lora_host.layers_to_kohya(model, _Frozen.wrap(run.result.snapshots[n])),
                                          _recipe.snapshot_save_name(save_name, n), progress.node_id))
            filename = save_trained(model, recipe, run, concept, samples, lora_sd, save_name, progress.node_id)
            saved.append(filename)
        loss_map = {"loss": list(run.result.losses), "lr": list(run.result.lrs)}
        ui = {contracts.UI_LOSS: run.result.history(), contracts.UI_LORA: saved}
        return io.NodeOutput(out_model, lora_sd, loss_map, filename, ui=ui)


def save_trained(model, recipe: _recipe.LoRARecipe, run: _th.TrainingRun, concept: str, samples, lora_sd,
                 save_name: str, node_id) -> str:
    """Save one trained LoRA with its metadata (the UNet layer names kohya sd-scripts writes for this architecture,
    SGM names for SDXL); returns its name as LoraLoader lists it."""
    metadata = lora_metadata(recipe, run, concept, samples, lora_sd, title=save_name.strip(),
                             sgm_names=_lora_host.is_sdxl(model))
    metadata.update(kohya_base_model_tags(model, run.prediction_type))
    metadata.update(flux_modelspec(model, metadata, title=save_name.strip(), samples=samples))
    return _lora_host.save_lora_file(_lora_host.sd_scripts_names(model, lora_sd), save_name, metadata, node_id)


def snapshot_recipe(recipe: _recipe.LoRARecipe, n: int) -> _recipe.LoRARecipe:
    """The recipe of the separate run a snapshot at ``n`` updates equals: ``n`` steps on this run's schedule."""
    return dataclasses.replace(recipe, steps=int(n), schedule_steps=recipe.schedule_length)


def snapshot_run(run: _th.TrainingRun, n: int) -> _th.TrainingRun:
    """``run`` as it stood after ``n`` updates (losses, learning rates, micro-steps), for the snapshot's metadata."""
    res = run.result
    per_update = res.micro_steps // max(len(res.losses), 1)
    cut = _train.TrainResult(losses=res.losses[:n], lrs=res.lrs[:n], grad_norms=res.grad_norms[:n],
                             micro_steps=per_update * n, optimizer=res.optimizer)
    return dataclasses.replace(run, result=cut)


class _Frozen:
    """A stored LoRA layer (``memora.lora.formats.LoraLayer``) where a trainable one's ``to_layer()`` is expected."""

    def __init__(self, layer):
        self.layer = layer

    def to_layer(self):
        return self.layer

    @classmethod
    def wrap(cls, layers: dict) -> dict:
        return {name: cls(layer) for name, layer in layers.items()}


NODES = [MemoRaLoRATrain]
