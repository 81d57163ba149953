"""AutoMemoRa: guidance between the unlearned model and the same model plus its MemoRa LoRA, as a GUIDER.

One copy of the weights: the guider is a CFGGuider on a clone of the unlearned MODEL (clones share the UNet) whose
LoRA layers carry a switchable weight function (ComfyUI ``add_weight_wrapper``): it adds the LoRA delta to the
weight, out of place, only while the guider has it switched on. Each sampling step makes one CFG prediction with the
switch off and one with it on, and mixes them (memora/guidance.py). Loading a second patched model instead would
unload the first (clones of one model cannot be resident together) or double the memory; comfy.hooks fail on
0.33's dynamic-VRAM patcher.

Batching: each side's positive and negative predictions go through the model in one batched forward (ComfyUI's
usual CFG batching). The two sides cannot share a forward: the switch acts on weights, so it is per forward, not per
batch item. A step therefore costs two forwards (one at w = 0 or w = 1, where only one side is needed)."""

from __future__ import annotations

import logging

import torch
import comfy.samplers
from comfy_api.latest import io

from memora import guidance
from memora.lora import apply as lora_apply
from memora.lora import formats
from . import _lora_host, _schema


def build_switchable_lora(model, lora_sd: dict):
    """(clone of MODEL with one switchable LoRA weight wrapper per layer, the switch, the wrappers' call counter,
    ignored text-encoder layers). Validates everything first: nothing is installed when a layer does not fit."""
    if not isinstance(lora_sd, dict) or not lora_sd:
        raise ValueError("lora is empty or not a LORA_MODEL (expected a dict of tensors)")
    if _lora_host.is_flux(model):
        return build_switchable_flux_lora(model, lora_sd)
    try:
        kohya = _lora_host.to_kohya_for_model(lora_sd, model)
    except formats.LoraFormatError as e:
        raise ValueError(f"lora: {e}") from e
    bad = sorted(k for k in kohya if k.endswith((".diff", ".diff_b", ".dora_scale")))
    if bad:
        raise ValueError(f"lora: full-weight diff or DoRA keys are not supported by the AutoMemoRa guider: {bad[:5]}")
    try:
        _, to_load, _, te = _lora_host.match_layers(model, kohya)
    except _lora_host.LoraKeyError as e:  # the message names both architectures where the shapes tell
        raise type(e)(f"lora: {e}") from e
    layers = formats.kohya_layers(kohya)
    weights = model.model.state_dict()
    planned = {}
    for name in sorted(to_load):
        key = to_load[name]
        layer = layers.get(name)
        if layer is None:
            raise ValueError(f"lora: layer {name!r} is not a lora_down/lora_up pair (only plain LoRA layers are "
                             f"supported by the AutoMemoRa guider)")
        if not isinstance(key, str) or key not in weights:
            raise ValueError(f"lora: layer {name!r} maps to {key!r}, which is not a weight of this model")
        planned[key] = layer
    if not planned:
        raise ValueError("lora: has no UNet layers (only text-encoder layers?); AutoMemoRa needs a UNet LoRA")
    if te:
        logging.warning("AutoMemoRa Guider: %d text-encoder LoRA layers ignored (both sides share the same "
                        "conditioning; MemoRa LoRAs are UNet-only)", len(te))
    clone = model.clone()
    switch = lora_apply.LoraSwitch()
    counter = _lora_host.install_lora_wrappers(clone, planned, switch)
    return clone, switch, counter, te


def build_switchable_flux_lora(model, lora_sd: dict):
    """:func:`build_switchable_lora` for a Flux MODEL: the LoRA's layers (diffusers Flux modules, any spelling
    ``memora.lora.flux.flux_layers`` reads) as switchable row-block wrappers on ComfyUI's fused weights. A LoRA for
    another architecture is refused naming it and the base."""
    from memora.lora import flux

    try:
        layers = flux.flux_layers(lora_sd)
    except formats.LoraFormatError as e:
        note = _lora_host.architecture_note(model, lora_sd) or f"the base checkpoint is {_lora_host.base_architecture(model)}."
        raise _lora_host.LoraKeyError(f"lora: not a Flux LoRA this guider can apply ({e}). {note}") from e
    slots = _lora_host.flux_slots(model)
    unknown = sorted(set(layers) - set(slots))
    if unknown:
        raise _lora_host.LoraKeyError(f"lora: {len(unknown)} layers name Flux modules this model does not have: "
                                      f"{unknown[:5]} (the base has {len(slots)} block layers)")
    bad = [f"{m}: LoRA delta {[layer.up.shape[0], layer.down.shape[1]]}, weight rows {list(slots[m].shape)}"
           for m, layer in sorted(layers.items()) if (layer.up.shape[0], layer.down[0].numel()) != slots[m].shape]
    if bad:
        raise _lora_host.LoraShapeError(f"lora: {len(bad)} layers do not fit this Flux model's weights (made for "
                                        f"another size?): {bad[:3]}")
    clone = model.clone()
    switch = lora_apply.LoraSwitch()
    counter = _lora_host.install_flux_wrappers(clone, layers, slots, switch)
    return clone, switch, counter, []


class AutoMemoRaGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose prediction is bad + w (main - bad), each side a CFG prediction of the same weights with the
    LoRA switched off or on. Overrides only predict_noise (sampling, loading and batching stay ComfyUI's)."""

    def __init__(self, model_patcher, switch: lora_apply.LoraSwitch, counter: lora_apply.CallCounter, w: float,
                 main: str):
        super().__init__(model_patcher)
        self.switch = switch
        self.counter = counter
        self.w = float(w)
        self.main = guidance.check_role(main)
        self.forwards = {"lora_on": 0, "lora_off": 0}

    def _side(self, lora_on: bool, x, timestep, model_options, seed):
        def predict():
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative", None),
                                                    self.conds.get("positive", None), self.cfg,
                                                    model_options=model_options, seed=seed)

        out, before = guidance.run_with_lora(self.switch, self.counter, lora_on, predict)
        self.forwards["lora_on" if lora_on else "lora_off"] += 1
        if before is not None:
            self.counter.check(before, "AutoMemoRa Guider (no guidance returned)")
        return out

    def predict_noise(self, x, timestep, model_options={}, seed=None, *args, **kwargs):
        need_bad, need_main = guidance.needed_sides(self.w)
        bad_on, main_on = guidance.lora_on_side(self.main)
        bad = self._side(bad_on, x, timestep, model_options, seed) if need_bad else None
        main = self._side(main_on, x, timestep, model_options, seed) if need_main else None
        return guidance.combine(bad, main, self.w)


class MemoRaAutoGuider(_schema.MemoRaNode):
    """AutoMemoRa guidance for SamplerCustomAdvanced: eps = eps_bad + w (eps_main - eps_bad), where one side is the
    unlearned model and the other the same model with the MemoRa LoRA, each with its own classifier-free guidance. w
    = 0 gives the bad side, w = 1 the main side exactly; w > 1 pushes further. Keeps ONE copy of the model weights:
    the LoRA is switched on and off between the two predictions (two forwards per step; one at w = 0 or 1)."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "AutoMemoRa Guider", inputs=[
            io.Model.Input("model", tooltip="The UNLEARNED model (without the LoRA)."),
            io.LoraModel.Input("lora", tooltip="The MemoRa LoRA recovered for this model (e.g. from MemoRa LoRA "
                                               "Train, MemoRa Load LoRA or MemoRa Multi-LoRA Merge)."),
            io.Conditioning.Input("positive", tooltip="The prompt's conditioning (used by both sides)."),
            io.Conditioning.Input("negative", tooltip="Negative conditioning for CFG (MemoRa: the empty prompt)."),
            io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                           tooltip="Classifier-free guidance scale of each side (MemoRa: 7.5)."),
            io.Float.Input("w", default=1.0, min=-10.0, max=20.0, step=0.05, round=0.0001,
                           tooltip="AutoMemoRa weight: 0 = the bad side only, 1 = the main side only, > 1 pushes "
                                   "beyond the main side, away from the bad one."),
            io.Combo.Input("main", options=list(guidance.MAIN_ROLES), default="lora",
                           tooltip="lora: main = model + LoRA, bad = unlearned model (push toward the recovered "
                                   "concept). unlearned: the roles swap (push away from it)."),
        ], outputs=[
            io.Guider.Output(display_name="guider", tooltip="A GUIDER for the stock SamplerCustomAdvanced."),
        ])

    @classmethod
    def execute(cls, model, lora, positive, negative, cfg, w, main) -> io.NodeOutput:
        guidance.check_role(main)
        if not torch.isfinite(torch.tensor(float(w))) or not torch.isfinite(torch.tensor(float(cfg))):
            raise ValueError(f"cfg and w must be finite numbers, got cfg={cfg}, w={w}")
        patched, switch, counter, _ = build_switchable_lora(model, lora)
        guider = AutoMemoRaGuider(patched, switch, counter, w, main)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


NODES = [MemoRaAutoGuider]
