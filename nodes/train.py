"""MemoRa LoRA Train: the reference recipe, in-process, on the MODEL it is given."""

from __future__ import annotations

import json

from comfy_api.latest import io

import memora
from memora.lora import recipe as _recipe
from memora.lora import save as _save
from . import _host, _lora_host
from . import _train_host as _th

DESCRIPTION = (
    "Trains a LoRA on the given (unlearned) model with the MemoRa recipe: epsilon-prediction MSE (the model's own "
    "velocity objective for v-prediction models) with t uniform over the training timesteps, LoRA down ~ N(0, "
    "(1/rank)^2) and up = 0 on the attention projections, AdamW with a cosine schedule to 0 and gradient norm "
    "clipping at 1.0, random horizontal flips, every random draw from one seeded generator (bit-identical results "
    "on the CPU for the same inputs). The input model is never modified; the queue's cancel stops within one "
    "step and writes nothing. The LoRA is saved in kohya format (loads in LoraLoader and diffusers) under "
    "models/loras/<save_name>_<counter>_.safetensors, never overwriting a file.")


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
        io.Combo.Input("targets", options=list(_recipe.TARGETS), default=_recipe.ATTENTION,
                       tooltip="attention: to_q, to_k, to_v, to_out.0 of every UNet attention (the reference; SD1.x: "
                               "128 layers, 797,184 parameters at rank 4); attention+feedforward: also ff.net.0.proj "
                               "and ff.net.2; all linear+conv: every Linear and Conv layer of the UNet."),
        io.Boolean.Input("random_flip", default=True,
                         tooltip="Flip each sample horizontally with probability 0.5 (the reference). The flipped "
                                 "latents are prepared once."),
        io.Combo.Input("precision", options=list(_th.PRECISIONS), default="auto",
                       tooltip="Precision of the frozen weights and the forward pass; LoRA parameters are always fp32. "
                               "auto: what ComfyUI runs this model in (fp32 on the CPU, usually fp16 on a GPU); fp16 "
                               "uses dynamic loss scaling."),
        io.Boolean.Input("gradient_checkpointing", default=False,
                         tooltip="Recompute the UNet blocks in the backward pass instead of keeping their "
                                 "activations: less memory, slower (one more forward pass per step). Same result."),
        io.Int.Input("seed", default=2024, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                     tooltip="Seeds the one generator behind every random draw: LoRA init, sample order, flips, "
                             "timesteps, noise (the reference: 2024)."),
        io.String.Input("save_name", default="memora/recovered",
                        tooltip="File prefix under models/loras (subfolders with '/'); the file is "
                                "<save_name>_<counter>_.safetensors and never overwrites one. Empty: do not save."),
    ]


def lora_metadata(recipe: _recipe.LoRARecipe, run: _th.TrainingRun, concept: str, samples, lora_sd) -> dict:
    """safetensors metadata (str -> str), deterministic: no time stamps or paths, so the same training gives the
    same file bytes."""
    res = run.result
    return {
        "memora.format": "kohya-sd lora (lora_unet_<diffusers module>.lora_down.weight / lora_up.weight / alpha)",
        "memora.pack_version": memora.__version__,
        "memora.recipe": recipe.to_json(),
        "memora.steps": str(recipe.steps),
        "memora.seed": str(recipe.seed),
        "memora.concept": concept,
        "memora.base_model_hash": run.base_model_hash,
        "memora.training_latents": json.dumps({"shape": list(samples.shape), "hash": _th.tensor_hash(samples)}),
        "memora.precision": _th.dtype_name(run.dtype),
        "memora.prediction_type": run.prediction_type,
        "memora.layers": str(run.wrapped_modules),
        "memora.trainable_parameters": str(run.trainable_parameters),
        "memora.final_loss": repr(res.losses[-1]) if res.losses else "",
        "memora.micro_steps": str(res.micro_steps),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(recipe.rank),
        "ss_network_alpha": repr(float(recipe.alpha)),
    }


class MemoRaLoRATrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemoRaLoRATrain",
            display_name="MemoRa LoRA Train",
            category="MemoRa",
            description=DESCRIPTION,
            inputs=_inputs(),
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="The input model with the trained LoRA applied at strength 1 (a patched clone)."),
                io.Custom("LORA_MODEL").Output(display_name="lora",
                                               tooltip="The trained LoRA in kohya format (for LoraModelLoader, MemoRa "
                                                       "nodes, Save LoRA)."),
                io.Custom("LOSS_MAP").Output(display_name="loss",
                                             tooltip="Per-update training loss {'loss': [...], 'lr': [...]}; plug "
                                                     "into the core Plot Loss Graph node."),
                io.String.Output(display_name="filename",
                                 tooltip="The saved file relative to the loras folder, as LoraLoader lists it "
                                         "(empty when save_name is empty)."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latents, positive, steps, rank, alpha, learning_rate, lr_schedule, batch_size,
                gradient_accumulation, targets, random_flip, precision, gradient_checkpointing, seed,
                save_name) -> io.NodeOutput:
        # -- every check before any work --
        samples = _host.check_latent(model, latents.get("samples") if isinstance(latents, dict) else None,
                                     "latents")
        _th.check_conditioning(positive)
        recipe = _recipe.LoRARecipe(steps=steps, rank=rank, alpha=alpha, learning_rate=learning_rate,
                                    lr_schedule=lr_schedule, batch_size=batch_size,
                                    gradient_accumulation=gradient_accumulation, targets=targets,
                                    random_flip=bool(random_flip), seed=seed).validate()
        _th.prediction_type(model)
        _th.target_layers(model, targets)
        _th.training_dtype(model, precision)
        save_name = (save_name or "").strip()
        root = None
        if save_name:
            root = _lora_host.loras_root()
            _th.check_save_target(root, save_name)
        hidden = getattr(cls, "hidden", None)
        node_id = getattr(hidden, "unique_id", None)
        concept = _th.concept_from_prompt(getattr(hidden, "prompt", None), node_id)

        # -- training (the input model is never modified; cancel raises out of here, nothing written) --
        progress = _th.TrainProgress(recipe.steps, node_id)
        run = _th.train_on_model(model, positive, samples, recipe, precision, bool(gradient_checkpointing),
                                 on_update=progress.update, on_micro_step=progress.micro_step)
        lora_sd = _th.to_kohya(model, run.layers)
        out_model, _report = _lora_host.apply_lora(model, lora_sd, 1.0)

        filename = ""
        if save_name:
            path = _save.save_safetensors_atomic(lora_sd, root, save_name,
                                                 metadata=lora_metadata(recipe, run, concept, samples, lora_sd))
            filename = _lora_host.relative_to_loras(path)
            _host.send_event("memora.lora_saved", {"node": progress.node_id, "filename": filename})
        loss_map = {"loss": list(run.result.losses), "lr": list(run.result.lrs)}
        ui = {"memora_loss": run.result.history(), "memora_lora": [filename] if filename else []}
        return io.NodeOutput(out_model, lora_sd, loss_map, filename, ui=ui)


NODES = [MemoRaLoRATrain]
