"""What ``--models`` / ``--original`` / ``--unlearned`` change in a workflow, addressed by node title.

A :class:`ModelProfile` swaps titled nodes for other classes, sets inputs of titled nodes and sets the text of
titled prompt nodes. Policy (no silent skips): every title a profile names must be in the workflow, except the
titles the profile lists as ``optional_titles`` (parts that some workflows do not have, e.g. "Original model" in
memora_from_images), which may be absent altogether; where a title is present, every input the profile sets on it
must exist and every value must fit the input's type, range and options. :func:`apply_profile` reports every
mismatch at once, and the runner stops before the first job."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from memora.contracts import (EVALUATED_MODELS, MODEL_TITLES, NODE_MICRO_DETECTOR, NODE_MICRO_WORLD,
                              TITLE_CONCEPT_PROMPT, TITLE_CONCEPT_SCORE, TITLE_EVALUATION_IMAGE_SIZE,
                              TITLE_EVALUATION_PROMPT, TITLE_EVALUATION_SEED, TITLE_NEVER_LEARNED_MODEL,
                              TITLE_ORIGINAL_MODEL, TITLE_SEED_IMAGE_SIZE, TITLE_TRAIN_LORA, concept_score_title,
                              evaluate_title)

from .workflow import (AddressError, apply_overrides, combo_options, first_resolvable, fitted_value, input_specs,
                       title_of)

TITLE = object()  # placeholder in a swap's inputs: the swapped node's own title
#: the inputs a titled prompt node's text may sit in, tried in order
TEXT_INPUTS = ("value", "text", "string", "prompt")
#: micro-world demo: images per evaluation (the detector rate is a share of these)
MICRO_EVAL_IMAGES = 32
#: the micro world's MemoRa LoRA recipe, the one copy (the micro profile, scripts/make_workflows.py's micro
#: workflows, scripts/micro_recovery.py): 50 updates at learning rate 3e-3 (docs/micro-world-results.md: at 1e-2
#: the LoRA destroys every concept, the erased one included, within 25 updates)
MICRO_LORA = {"steps": 50, "learning_rate": 3e-3}
#: the micro-world variant each model role of a workflow gets (roles not listed: the variant of the same name)
MICRO_VARIANTS = {"unlearned": "esd_x"}
NODE_CHECKPOINT_LOADER = "CheckpointLoaderSimple"
#: MemoRa Load Unlearned Model: inputs ckpt_name (the base), unlearned_weights ('<folder>/<file>'), lora_strength
NODE_UNLEARNED_LOADER = "MemoRaLoadUnlearnedModel"
#: the loader's list prefixes -> ComfyUI model folders (nodes/unlearned.py FILE_SOURCES / PIPELINE_SOURCES)
WEIGHT_FOLDERS = {"unlearned": "unlearned", "unet": "diffusion_models", "loras": "loras",
                  "checkpoints": "checkpoints", "diffusers": "diffusers"}


@dataclass
class Setting:
    """One thing the runner sets before the sweep: ``address`` ('<title>.<input>', or a title for a swap),
    ``value``, and ``source`` (the option it comes from), as --dry-run prints it."""

    address: str
    value: Any
    source: str
    #: a node swap: ``value`` describes the new node ('MemoRaLoadMicroWorld(variant='original')')
    swap: bool = False


@dataclass
class ModelProfile:
    """Node swaps (title, or 'prefix*' -> (class, inputs)), input defaults ('<title>.<input>' -> value), texts for
    titled prompt nodes, the titles a workflow may lack, and the metric the demo reports as the concept detector."""

    swaps: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    texts: dict = field(default_factory=dict)
    optional_titles: frozenset = frozenset()
    #: groups of titles that a workflow has all or none of (a workflow of parts, e.g. automemora or multi_memora,
    #: has no MemoRa pipeline and no evaluation of its own): a group none of whose titles is in the workflow is
    #: left out like an optional title (listed as 'not in this workflow'); a group partly there is a problem for
    #: every missing title, as for any other title
    optional_groups: tuple = ()
    detector_metric: Optional[str] = None
    description: str = ""
    source: str = "--models"
    #: what --unlearned's file was detected as ('' when not read: a server's file, or no --unlearned)
    unlearned_format: str = ""


def model_profile(models: Optional[str], original: Optional[str] = None,
                  unlearned: Optional[str] = None, backend=None) -> ModelProfile:
    """The profile of --models / --original / --unlearned. With a ``backend``, ``unlearned`` may be any file MemoRa
    Load Unlearned Model reads: :func:`unlearned_loader` picks the loader from the file."""
    prof = ModelProfile()
    if models == "micro":
        prof = micro_world_profile()
    elif models not in (None, "", "checkpoints"):
        raise ValueError(f"--models {models!r}: expected 'micro' (the built-in micro world) or 'checkpoints'")
    given = (("original", original), ("unlearned", unlearned))
    for variant, ckpt in given:
        if ckpt:
            prof.swaps[MODEL_TITLES[variant]] = (NODE_CHECKPOINT_LOADER, {"ckpt_name": ckpt})
    if unlearned and backend is not None:
        prof.swaps[MODEL_TITLES["unlearned"]], prof.unlearned_format = unlearned_loader(unlearned, original, backend)
    if any(ckpt for _, ckpt in given):
        # a loader named on the command line must be in the workflow
        prof.optional_titles = prof.optional_titles - {MODEL_TITLES[v] for v, ckpt in given if ckpt}
        prof.source = "--models / --original / --unlearned" if models else "--original / --unlearned"
    return prof


# -- --unlearned: which loader takes the file -----------------------------------------------------------------------
def _options(object_info: dict, node_type: str, name: str) -> list[str]:
    info = object_info.get(node_type)
    return [str(o) for o in combo_options(input_specs(info).get(name)) or []] if info else []


def _weights_entry(name: str, options: list[str]) -> Optional[str]:
    """MemoRa Load Unlearned Model's list entry for ``name``: the entry itself ('unlearned/x.pt'), else the one
    '<folder>/<name>' entry (checkpoints/ last: a file in several folders is taken from the loader's own first)."""
    if name in options:
        return name
    hits = [o for o in options if o.split("/", 1)[-1].rstrip("/") == name.rstrip("/")]
    hits.sort(key=lambda o: o.startswith("checkpoints/"))
    return hits[0] if hits else None


def _local_path(entry: str, backend) -> Optional[Path]:
    """The file (or pipeline folder) of a loader entry when ComfyUI runs in this process (EmbeddedBackend), where
    the pack's detection can read it; None for servers (their files are theirs)."""
    from .backend import EmbeddedBackend

    label, rest = entry.split("/", 1)
    if not isinstance(backend, EmbeddedBackend) or label not in WEIGHT_FOLDERS:
        return None
    import folder_paths

    for root in folder_paths.get_folder_paths(WEIGHT_FOLDERS[label]):
        path = Path(root, rest.rstrip("/"))
        if path.exists():
            return path
    return None


def detected_format(path: Path) -> tuple[str, bool]:
    """(format, is a full checkpoint) of an unlearned-weights file, by memora.zoo's own detection on its keys (a
    safetensors header is read without its tensors). A full checkpoint (ldm UNet, text encoder and VAE) loads with
    the stock CheckpointLoaderSimple; everything else needs a base."""
    import torch

    from memora import zoo

    if path.is_dir():
        return zoo.load_unlearned(path).format, False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            content = {k: torch.empty(0) for k in f.keys()}
    except Exception:  # not safetensors: zoo reads pickles safely (weights_only, memory-mapped archives)
        content = zoo.read_file(path)
    weights = zoo.detect(content, path.name)
    has_vae = any(str(k).startswith("first_stage_model.") for k in _flat_keys(content))
    full = weights.format == zoo.LDM_CHECKPOINT and bool(weights.unet) and bool(weights.text_encoder) and has_vae
    return weights.format, full


def _flat_keys(content: dict) -> list:
    inner = content.get("state_dict") if isinstance(content.get("state_dict"), dict) else content
    return list(inner)


def unlearned_loader(name: str, base: Optional[str], backend) -> tuple[tuple[str, dict], str]:
    """((loader class, inputs), detected format) for --unlearned ``name``: a full checkpoint in models/checkpoints
    loads with CheckpointLoaderSimple as before; any other file MemoRa Load Unlearned Model lists (UNet-only,
    partial, text-encoder-only, LoRA-shaped, pipeline folders, ...) loads through it on ``base`` (--original; without
    it, the loader's own ckpt_name in the workflow). The format comes from memora.zoo's detection when the file is
    on this machine (embedded runs); on a server the folder decides (checkpoints -> CheckpointLoaderSimple)."""
    types = [t for t in (NODE_CHECKPOINT_LOADER, NODE_UNLEARNED_LOADER) if t in backend.available_types()]
    info = backend.object_info(types)
    checkpoints = _options(info, NODE_CHECKPOINT_LOADER, "ckpt_name")
    entry = _weights_entry(name, _options(info, NODE_UNLEARNED_LOADER, "unlearned_weights"))
    path = _local_path(entry, backend) if entry else None
    fmt, full = detected_format(path) if path is not None else ("", name in checkpoints)
    if (full or entry is None) and name in checkpoints:
        return (NODE_CHECKPOINT_LOADER, {"ckpt_name": name}), fmt
    if entry is None:
        folders = ", ".join(f"models/{f}" for f in WEIGHT_FOLDERS.values())
        raise ValueError(f"--unlearned {name!r}: no such checkpoint or unlearned-weights file where ComfyUI looks "
                         f"({folders}; {backend.describe()}); expected a name as MemoRa Load Unlearned Model lists "
                         f"it, e.g. 'unlearned/esd-nudity-UNET-SD.pt' or 'esd-nudity-UNET-SD.pt'")
    inputs = {"unlearned_weights": entry}
    if base:
        inputs["ckpt_name"] = base
    return (NODE_UNLEARNED_LOADER, inputs), fmt


def load_reports(ui_outputs: dict, api: dict) -> dict[str, str]:
    """{node title: report} of the MemoRa Load Unlearned Model nodes that ran (their UI text)."""
    out = {}
    for nid, ui in (ui_outputs or {}).items():
        node = api.get(nid) or {}
        if node.get("class_type") == NODE_UNLEARNED_LOADER and isinstance(ui, dict) and ui.get("text"):
            out[title_of(api, nid)] = "\n".join(str(t) for t in ui["text"])
    return out


def micro_world_profile() -> ModelProfile:
    """The built-in micro world (memora.micro, weights shipped with the pack): its three models for the titled
    loaders, its concept detector for the nodes titled 'Concept score ...', its erased concept's caption for the
    concept and evaluation prompts, its image size for the titled size nodes."""
    from memora.micro import world

    manifest = world.load_manifest()  # a clear FileNotFoundError when the weights are absent
    concept = manifest.get("erased_concept", world.ERASED_CONCEPT)
    # Empty Latent Image divides by 8 (SD's VAE); the micro VAE is 4x, so its 8 x 8 latents come from 64 x 64
    size = int(manifest.get("empty_latent_size") or world.EMPTY_LATENT_SIZE)
    prof = ModelProfile(description=f"built-in micro world: tiny SD1.x-family models trained on procedural shapes, "
                                    f"shipped with the pack; concept {concept!r} erased by ESD-x "
                                    f"(variant {MICRO_VARIANTS['unlearned']!r})",
                        source="--models micro")
    for role, title in MODEL_TITLES.items():
        # the workflows' "unlearned model" is the micro world's ESD-x variant (its default)
        prof.swaps[title] = (NODE_MICRO_WORLD, {"variant": MICRO_VARIANTS.get(role, role)})
    prof.swaps[TITLE_CONCEPT_SCORE + "*"] = (NODE_MICRO_DETECTOR, {"concept": concept, "title": TITLE})
    # every image the micro models draw is at the world's size (the attack workflows' kept-concept images too: at
    # SD's 512 px a DDIM step of the micro UNet took ~17 s on a CPU and the LoRA trained on 8x-size latents)
    from .attacks import TITLE_KEPT_SIZE

    for title in (TITLE_SEED_IMAGE_SIZE, TITLE_EVALUATION_IMAGE_SIZE, TITLE_KEPT_SIZE):
        prof.defaults[f"{title}.width"] = size
        prof.defaults[f"{title}.height"] = size
    prof.defaults[f"{TITLE_EVALUATION_IMAGE_SIZE}.batch_size"] = MICRO_EVAL_IMAGES
    # The micro world's MemoRa settings as its own experiment uses them (MICRO_LORA), evaluation with DDIM 50 steps,
    # seed 1.
    prof.defaults.update({f"{TITLE_TRAIN_LORA}.{k}": v for k, v in MICRO_LORA.items()})
    prof.defaults[f"{TITLE_EVALUATION_SEED}.value"] = 1
    for model in EVALUATED_MODELS:
        prof.defaults[f"{evaluate_title(model)}.sampler_name"] = "ddim"
        prof.defaults[f"{evaluate_title(model)}.scheduler"] = "ddim_uniform"
    prompt = world.erased_prompt(manifest)
    prof.texts = {TITLE_CONCEPT_PROMPT: prompt, TITLE_EVALUATION_PROMPT: prompt}
    # memora_from_images has no original model (nor its seed images and evaluation); no shipped workflow has a
    # never-learned model
    prof.optional_titles = frozenset({TITLE_ORIGINAL_MODEL, TITLE_NEVER_LEARNED_MODEL, TITLE_SEED_IMAGE_SIZE,
                                      evaluate_title("original"), TITLE_KEPT_SIZE})
    # the shipped workflows of parts: automemora (no training, evaluation or scores of its own: an unlearned model,
    # a LoRA file, a guider) and multi_memora (two trainings titled per concept, one evaluation, no scores)
    prof.optional_groups = (
        frozenset({TITLE_CONCEPT_SCORE + "*", TITLE_TRAIN_LORA, TITLE_EVALUATION_SEED, TITLE_CONCEPT_PROMPT,
                   *(evaluate_title(m) for m in EVALUATED_MODELS)}),
        frozenset({TITLE_EVALUATION_IMAGE_SIZE, TITLE_EVALUATION_PROMPT}))
    prof.detector_metric = f"{concept_score_title('recovered')}.{concept}.rate"
    return prof


def absent_groups(profile: ModelProfile, api: dict, aliases: dict) -> frozenset:
    """The titles of ``profile.optional_groups`` that the workflow lacks altogether (each group: all or nothing)."""
    out: set = set()
    for group in profile.optional_groups:
        if not any(_has_title(t, api, aliases) for t in group):
            out |= group
    return frozenset(out)


# -- applying a profile ----------------------------------------------------------------------------------------------
def _title_matcher(title: str):
    return (lambda t: t.startswith(title[:-1])) if title.endswith("*") else (lambda t: t == title)


def _has_title(title: str, api: dict, aliases: dict) -> bool:
    match = _title_matcher(title)
    return any(match(title_of(api, nid)) for nid in api) or any(match(str(k)) for k in aliases)


def _defaults_of(info: dict) -> dict:
    defaults = {}
    for name, spec in ((info.get("input") or {}).get("required") or {}).items():
        if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
            defaults[name] = spec[1]["default"]
        elif isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], list) and spec[0]:
            defaults[name] = spec[0][0]
    return defaults


def swap_nodes(api: dict, swaps: dict, object_info: dict) -> dict:
    """Replace the nodes with a given title by another class: ``{title: (class_type, inputs)}``. The new node gets
    its defaults, then the old node's inputs that it also has (links included), then ``inputs`` (each checked
    against the new class's input spec: AddressError if it has no such input or the value does not fit). Output
    slots keep their positions (e.g. a checkpoint loader's MODEL, CLIP, VAE). A title that matches no node is
    AddressError too."""
    out = copy.deepcopy(api)
    for title, (class_type, inputs) in swaps.items():
        info = object_info.get(class_type)
        if info is None:
            raise AddressError(f"swap {title!r} -> {class_type}: no definition of node type {class_type}")
        specs = input_specs(info)
        match = _title_matcher(title)
        ids = [n for n in out if match(title_of(out, n))]
        if not ids:
            raise AddressError(f"swap {title!r} -> {class_type}: the workflow has no node titled {title!r}")
        for nid in ids:
            node_title = title_of(out, nid)
            given = {}
            for k, v in inputs.items():
                if k not in specs:
                    raise AddressError(f"swap {title!r} -> {class_type}: {class_type} has no input {k!r} "
                                       f"(inputs: {', '.join(specs)})")
                given[k] = fitted_value(node_title if v is TITLE else v, specs[k], f"{node_title}.{k}")
            kept = {k: v for k, v in out[nid].get("inputs", {}).items() if k in specs}
            out[nid] = {"class_type": class_type, "inputs": {**_defaults_of(info), **kept, **given},
                        "_meta": {"title": node_title}}
    return out


def text_address(title: str, api: dict, object_info: dict, aliases: dict) -> str:
    """The text input of the node titled ``title`` (a string primitive's value, a text encoder's text, ...)."""
    found = first_resolvable([f"{title}.{inp}" for inp in TEXT_INPUTS], api, object_info, aliases)
    if found:
        return found
    raise AddressError(f"the workflow has no node titled {title!r} with a text input ({', '.join(TEXT_INPUTS)})")


def apply_profile(api: dict, profile: ModelProfile, object_info: dict,
                  aliases: dict) -> tuple[dict, list[Setting], list[str]]:
    """(the graph with the profile applied, what was set, problems). Titles in ``profile.optional_titles`` that the
    workflow lacks are listed as settings with the value ``None`` ('not in this workflow')."""
    settings, problems = [], []
    src = profile.source
    optional = profile.optional_titles | absent_groups(profile, api, aliases)
    for title, (class_type, inputs) in profile.swaps.items():
        if title in optional and not _has_title(title, api, aliases):
            settings.append(Setting(title, None, src, swap=True))
            continue
        try:
            api = swap_nodes(api, {title: (class_type, inputs)}, object_info)
        except AddressError as e:
            problems.append(f"{src}: {e}")
            continue
        shown = ", ".join(f"{k}={'<its title>' if v is TITLE else repr(v)}" for k, v in inputs.items())
        settings.append(Setting(title, f"{class_type}({shown})", src, swap=True))
    wanted = [(a.rsplit(".", 1)[0], a, v) for a, v in profile.defaults.items()]
    wanted += [(t, None, text) for t, text in profile.texts.items()]  # a text: the node's text input, found below
    for title, address, value in wanted:
        if title in optional and not _has_title(title, api, aliases):
            settings.append(Setting(address or f"{title}.<text>", None, src))
            continue
        try:
            address = address or text_address(title, api, object_info, aliases)
            api = apply_overrides(api, {address: value}, object_info, aliases)
        except AddressError as e:
            problems.append(f"{src}: {e}")
            continue
        settings.append(Setting(address, value, src))
    return api, settings, problems

