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
from typing import Any, Optional

from memora.contracts import (EVALUATED_MODELS, MODEL_TITLES, NODE_MICRO_DETECTOR, NODE_MICRO_WORLD,
                              TITLE_CONCEPT_PROMPT, TITLE_CONCEPT_SCORE, TITLE_EVALUATION_IMAGE_SIZE,
                              TITLE_EVALUATION_PROMPT, TITLE_EVALUATION_SEED, TITLE_NEVER_LEARNED_MODEL,
                              TITLE_ORIGINAL_MODEL, TITLE_SEED_IMAGE_SIZE, TITLE_TRAIN_LORA, concept_score_title,
                              evaluate_title)

from .workflow import (AddressError, apply_overrides, first_resolvable, fitted_value, input_specs, title_of)

TITLE = object()  # placeholder in a swap's inputs: the swapped node's own title
#: the inputs a titled prompt node's text may sit in, tried in order
TEXT_INPUTS = ("value", "text", "string", "prompt")
#: micro-world demo: images per evaluation (the detector rate is a share of these)
MICRO_EVAL_IMAGES = 32
#: the micro-world variant each model role of a workflow gets (roles not listed: the variant of the same name)
MICRO_VARIANTS = {"unlearned": "esd_x"}


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
    detector_metric: Optional[str] = None
    description: str = ""
    source: str = "--models"


def model_profile(models: Optional[str], original: Optional[str] = None,
                  unlearned: Optional[str] = None) -> ModelProfile:
    prof = ModelProfile()
    if models == "micro":
        prof = micro_world_profile()
    elif models not in (None, "", "checkpoints"):
        raise ValueError(f"--models {models!r}: expected 'micro' (the built-in micro world) or 'checkpoints'")
    given = (("original", original), ("unlearned", unlearned))
    for variant, ckpt in given:
        if ckpt:
            prof.swaps[MODEL_TITLES[variant]] = ("CheckpointLoaderSimple", {"ckpt_name": ckpt})
    if any(ckpt for _, ckpt in given):
        # a loader named on the command line must be in the workflow
        prof.optional_titles = prof.optional_titles - {MODEL_TITLES[v] for v, ckpt in given if ckpt}
        prof.source = "--models / --original / --unlearned" if models else "--original / --unlearned"
    return prof


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
    for title in (TITLE_SEED_IMAGE_SIZE, TITLE_EVALUATION_IMAGE_SIZE):
        prof.defaults[f"{title}.width"] = size
        prof.defaults[f"{title}.height"] = size
    prof.defaults[f"{TITLE_EVALUATION_IMAGE_SIZE}.batch_size"] = MICRO_EVAL_IMAGES
    # The micro world's MemoRa settings as its own experiment uses them (scripts/micro_recovery.py, Settings):
    # 100 LoRA updates at learning rate 1e-2 (at 1e-3 the micro LoRA stays too small to change the images),
    # evaluation with DDIM 50 steps, seed 1.
    prof.defaults.update({f"{TITLE_TRAIN_LORA}.steps": 100, f"{TITLE_TRAIN_LORA}.learning_rate": 1e-2,
                          f"{TITLE_EVALUATION_SEED}.value": 1})
    for model in EVALUATED_MODELS:
        prof.defaults[f"{evaluate_title(model)}.sampler_name"] = "ddim"
        prof.defaults[f"{evaluate_title(model)}.scheduler"] = "ddim_uniform"
    prompt = world.erased_prompt(manifest)
    prof.texts = {TITLE_CONCEPT_PROMPT: prompt, TITLE_EVALUATION_PROMPT: prompt}
    # memora_from_images has no original model (nor its seed images and evaluation); no shipped workflow has a
    # never-learned model
    prof.optional_titles = frozenset({TITLE_ORIGINAL_MODEL, TITLE_NEVER_LEARNED_MODEL, TITLE_SEED_IMAGE_SIZE,
                                      evaluate_title("original")})
    prof.detector_metric = f"{concept_score_title('recovered')}.{concept}.rate"
    return prof


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
    for title, (class_type, inputs) in profile.swaps.items():
        if title in profile.optional_titles and not _has_title(title, api, aliases):
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
        if title in profile.optional_titles and not _has_title(title, api, aliases):
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

