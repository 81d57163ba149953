"""Multi-LoRA merge (Multi-MemoRa: one LoRA per recovered concept, merged into one)."""

from __future__ import annotations

import json

from comfy_api.latest import io

import memora
from memora.lora import apply as lora_apply
from memora.lora import flux, formats, merge
from memora.lora import metadata as _metadata
from . import _host, _lora_host, _schema

SLOTS = 4

_METHOD_TOOLTIP = (
    "concat: exact (ranks concatenated; the result behaves exactly like the LoRAs stacked at their weights; its rank "
    "is the sum of the input ranks). svd: the weighted sum of every layer's delta-W truncated to 'rank' (the report "
    "gives the energy kept per layer). ties / dare_linear / dare_ties / magnitude_prune: peft's merge of the delta-W "
    "tensors (TIES sign election, DARE random drop and rescale, magnitude pruning, keeping 'density' of the entries), "
    "re-factorised to 'rank'.")


def _slot_inputs():
    inputs = []
    for i in range(1, SLOTS + 1):
        inputs.append(io.LoraModel.Input(
            f"lora_{i}", optional=i > 1,
            tooltip=(f"LoRA {i} (a LORA_MODEL: e.g. from MemoRa LoRA Train or MemoRa Load LoRA; kohya, diffusers or "
                     f"PEFT keys, any rank)." + ("" if i == 1 else " Optional: leave unconnected to merge fewer."))))
        inputs.append(io.Float.Input(
            f"weight_{i}", default=1.0, min=-10.0, max=10.0, step=0.05, round=0.0001,
            tooltip=f"Weight of LoRA {i} in the merge (its delta is multiplied by this; 0 leaves it out)."))
    return inputs


def _normalise(sd, slot: int) -> tuple[dict, str]:
    """A LORA_MODEL of any format -> ({layer: LoraLayer}, format name)."""
    what = f"lora_{slot}"
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{what} is empty or not a LORA_MODEL (expected a dict of tensors)")
    try:
        fmt = formats.detect_format(sd)
    except formats.LoraFormatError as e:
        raise ValueError(f"{what}: {e}") from e
    # ComfyUI-native keys name ldm modules: this node has no model to read the layout from, so the layout is the one
    # of the UNets MemoRa works on (SD1.x/SD2.x, or SDXL) whose module names hold every layer of the file.
    ldm = None
    if fmt == formats.COMFY:
        ldm = native_layout_map(sd, what)
    return merge.normalise(sd, ldm, what=what), fmt


NATIVE_LAYOUTS = (("SD1.x/SD2.x", _lora_host.sd15_ldm_to_diffusers_map),
                  ("SDXL", _lora_host.sdxl_ldm_to_diffusers_map))


def native_layout_map(sd: dict, what: str) -> dict:
    """The ldm -> diffusers module map of the first layout in NATIVE_LAYOUTS that has every layer of a ComfyUI-native
    LoRA (diffusion_model.<ldm path> keys); ValueError naming the layers no layout has. (Where the layouts share an
    ldm name, ComfyUI maps it to the same diffusers name in both, so the choice never renames a shared layer.)"""
    prefix = "diffusion_model."
    names = lora_apply.layer_names(sd)
    unknown: list = []
    for _label, layout in NATIVE_LAYOUTS:
        ldm_map = layout()
        unknown = [n for n in names if not n.startswith(prefix) or n[len(prefix):] not in ldm_map]
        if not unknown:
            return ldm_map
    layouts = " and ".join(label for label, _ in NATIVE_LAYOUTS)
    raise ValueError(
        f"{what}: a ComfyUI-native LoRA (diffusion_model.<ldm path> keys) with {len(unknown)} layers that exist in "
        f"neither the {layouts} UNet layouts, the layouts this node reads ComfyUI-native names with (it has no model "
        f"input): {unknown[:5]}{' ...' if len(unknown) > 5 else ''}. Is it made for another architecture (Flux, SD3, "
        f"...)? Load it with MemoRa Load LoRA with its model connected, which converts it to kohya names, and merge "
        f"that output.")


def check_families(loras: list) -> bool:
    """``loras``: (slot, LORA_MODEL) pairs. True when every input is a Flux LoRA (``memora.lora.flux.is_flux_lora``), False when none is; ValueError
    naming the slots when Flux and UNet LoRAs are mixed (their layers never overlap: the "merge" would be two
    LoRAs for two architectures in one file, half of which no model can load)."""
    kinds = [(slot, flux.is_flux_lora(sd)) for slot, sd in loras]
    if any(k for _, k in kinds) and not all(k for _, k in kinds):
        fl = [f"lora_{i}" for i, k in kinds if k]
        other = [f"lora_{i}" for i, k in kinds if not k]
        raise ValueError(f"cannot merge Flux LoRAs ({', '.join(fl)}) with LoRAs for another architecture "
                         f"({', '.join(other)}: not Flux transformer layers); merge LoRAs made for one base model")
    return bool(kinds) and all(k for _, k in kinds)


def merge_metadata(result: merge.MergeResult, sources: list[dict], title: str) -> dict[str, str]:
    extra = {
        "memora.merge_method": result.method,
        "memora.merge_rank": str(result.rank),
        "memora.merge_density": repr(result.density),
        "memora.merge_seed": str(result.seed),
        "memora.merge_sources": json.dumps(sources),
        "memora.merge_min_energy_kept": repr(result.min_energy),
    }
    merged_from = ", ".join(f"lora_{s['slot']} x {s['weight']:g} (sha256 {s['sha256']})" for s in sources)
    return _metadata.lora_metadata(result.state_dict, formats.summarize(result.state_dict),
                                   version=memora.__version__, title=title, merged_from=merged_from, extra=extra)


class MemoRaMultiLoRAMerge(_schema.MemoRaNode):
    """Merges up to four LoRAs into one (Multi-MemoRa: one recovered concept per LoRA, all brought back by one
    adapter). Inputs of different ranks, layer sets (a missing layer counts as zero) or key formats are normalised
    first; layers whose shapes differ between inputs are refused by name. The order of the inputs never changes the
    result. Optionally saves the merge to models/loras (atomic, never overwriting; the file's metadata lists the
    sources and the method)."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa Multi-LoRA Merge", "LoRA", inputs=[
            *_slot_inputs(),
            io.Combo.Input("method", options=list(merge.METHODS), default="concat", tooltip=_METHOD_TOOLTIP),
            io.Int.Input("rank", default=0, min=0, max=4096,
                         tooltip="Output rank per layer for svd and the peft methods; 0 = automatic (svd: every "
                                 "component, i.e. exact; peft methods: the sum of the input ranks). concat "
                                 "ignores it."),
            io.Float.Input("density", default=0.5, min=0.01, max=1.0, step=0.01, round=0.0001,
                           tooltip="ties / dare / magnitude_prune: the fraction of each delta's entries kept "
                                   "(1 keeps everything). Ignored by concat and svd."),
            io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                         tooltip="dare_linear / dare_ties: seed of the random drop (the same seed gives the same "
                                 "merge). Ignored by the other methods."),
            _schema.save_name_input("", "Empty: do not save. Otherwise a file prefix under models/loras ('/' "
                                        "makes subfolders); a counter is added so no file is ever overwritten."),
        ], outputs=[
            _schema.lora_output("The merged LoRA (kohya format) for LoraModelLoader or the MemoRa nodes."),
            _schema.report_output("The sources, the method, and per layer the merged rank and the energy kept "
                                  "(sum of kept s^2 / total; 1 = exact)."),
            _schema.filename_output("The saved file relative to the loras folder (empty when not saved)."),
        ])

    @classmethod
    def execute(cls, lora_1, weight_1, method, rank, density, seed, save_name, lora_2=None, weight_2=1.0,
                lora_3=None, weight_3=1.0, lora_4=None, weight_4=1.0) -> io.NodeOutput:
        given = [(i, sd, float(w)) for i, (sd, w) in enumerate(
            [(lora_1, weight_1), (lora_2, weight_2), (lora_3, weight_3), (lora_4, weight_4)], 1) if sd is not None]
        if method not in merge.METHODS:
            raise ValueError(f"method must be one of {list(merge.METHODS)}, got {method!r}")
        save_name = (save_name or "").strip()
        _lora_host.check_save_name(save_name)  # a bad name or folder is refused before any work
        inputs, sources = [], []
        for slot, sd, w in given:
            layers, fmt = _normalise(sd, slot)
            inputs.append(layers)
            ranks = sorted({layer.rank for layer in layers.values()})
            sources.append({"slot": slot, "weight": w, "format": fmt, "layers": len(layers), "ranks": ranks,
                            "sha256": merge.fingerprint(layers)[:16]})
        import comfy.model_management

        flux_inputs = check_families([(slot, sd) for slot, sd, _w in given])
        progress = _host.StageProgress("merge", max(1, len(set().union(*[set(x) for x in inputs]))))
        result = merge.merge_layers(inputs, [s["weight"] for s in sources], method, rank, density, seed,
                                    device=comfy.model_management.get_torch_device(), progress=progress)
        if flux_inputs:  # back to the Flux LORA_MODEL (diffusers keys), which ComfyUI and diffusers read
            result.state_dict = flux.kohya_to_flux_diffusers(result.state_dict)
        lines = [f"LoRA {s['slot']}: weight {s['weight']:g}, {s['format']} format, {s['layers']} layers, "
                 f"rank {', '.join(map(str, s['ranks']))}" for s in sources]
        report = "\n".join(lines + [result.report()])
        filename = ""
        if save_name:
            filename = _lora_host.save_lora_file(result.state_dict, save_name,
                                                 merge_metadata(result, sources, save_name))
            report += f"\nsaved as {filename}"
        return io.NodeOutput(result.state_dict, report, filename, ui=_lora_host.saved_ui(filename))


NODES = [MemoRaMultiLoRAMerge]
