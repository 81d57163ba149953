"""The recovery attacks of ``memora-batch scoreboard``: which workflow runs each one, which node types it needs, which
models it runs on, and what the attacker must know (docs/attacks.md).

Standard library only: scripts/make_attack_workflows.py (which writes the workflows) and the scoreboard share it.
Every attack workflow has the titles of memora_recovery (``Original model``, ``Unlearned model``, ``Concept prompt``,
``Evaluation prompt`` / ``seed`` / ``guidance`` / ``image size``, ``Concept score (original|unlearned|recovered)``,
``Similarity to original (recovered|unlearned)``); the attacked model's images are the ``recovered`` ones. The
no-attack baseline is the unlearned model with the plain prompt, drawn as its ``recovered`` images."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

#: knowledge tiers, strongest first (the attack nodes' cost tables name theirs in the ``knowledge`` column)
WEIGHTS, IMAGES, TEXT_ENCODER, PROMPTS = "weights+gradients", "concept images", "text encoder only", "prompts only"
TIERS = (WEIGHTS, IMAGES, TEXT_ENCODER, PROMPTS)

#: titles the attack workflows add to memora_recovery's (memora.contracts)
TITLE_KEPT_PROMPT = "Kept concept prompt"          # concept resurgence: what the LoRA is trained on
TITLE_OTHER_PROMPT = "Other erased concept prompt"  # Multi-MemoRa: the model's second erased concept
TITLE_NEUTRAL_PROMPT = "Neutral prompt"            # concept vector: the prompts without the concept
TITLE_AUTO_GUIDER = "AutoMemoRa Guider"
TITLE_AUTO_SAMPLER = "AutoMemoRa sampler"
TITLE_AUTO_SCHEDULE = "AutoMemoRa schedule"
TITLE_AUTO_EVALUATE = "Evaluate recovered (AutoMemoRa)"
TITLE_KEPT_IMAGES = "Kept concept images"
TITLE_KEPT_SIZE = "Kept image size"
TITLE_TRAIN_OTHER = "Train LoRA (other concept)"
#: the score table every attack node publishes: "<display name>: cost" (columns below)
COST_SUFFIX = ": cost"
COST_COLUMNS = ("forward_calls", "backward_calls", "concept_images", "seconds")
#: concept images the shipped attack workflows give the attacker (the reference's three seed pairs)
SEED_IMAGES = 6


@dataclass(frozen=True)
class Attack:
    """One row family of the scoreboard. ``workflow``: example_workflows/<workflow>.json; ``nodes``: node types it
    needs beyond memora_recovery's (a pack without them skips the row, saying why); ``knowledge``: the tier when no
    node of the workflow publishes one; ``concept_images``: images of the concept the attacker holds, when no node
    says; ``on_control``: also run on the never-learned control (``--control``); ``multi``: needs a second erased
    concept; ``paper``: where it comes from."""

    name: str
    workflow: str
    nodes: tuple = ()
    knowledge: str = WEIGHTS
    concept_images: int = 0
    on_control: bool = False
    multi: bool = False
    paper: str = ""
    what: str = ""
    extra: dict = field(default_factory=dict)


ATTACKS: tuple[Attack, ...] = (
    Attack("no attack", "attack_baseline", knowledge=PROMPTS, paper="-",
           what="the unlearned model with the plain prompt: the rate every attack is tested against"),
    Attack("MemoRa", "memora_recovery", concept_images=SEED_IMAGES, paper="Polowczyk et al. 2025 (arXiv 2510.03263)",
           what="invert the concept images with the unlearned model, slerp, regenerate, train a LoRA"),
    Attack("AutoMemoRa (w=2)", "attack_automemora", nodes=("MemoRaAutoGuider",), concept_images=SEED_IMAGES,
           paper="Polowczyk et al. 2025", what="MemoRa's LoRA, sampled with eps_bad + 2 (eps_lora - eps_bad)"),
    Attack("Multi-MemoRa", "attack_multi_memora", nodes=("MemoRaMultiLoRAMerge",), concept_images=2 * SEED_IMAGES,
           multi=True, paper="Polowczyk et al. 2025",
           what="one MemoRa LoRA per erased concept, merged (concat); the target concept measured"),
    Attack("direct relearning", "attack_direct_relearning", concept_images=SEED_IMAGES, on_control=True,
           paper="the baseline of every recovery attack",
           what="the same LoRA trained directly on the VAE-encoded concept images (no inversion, slerp, "
                "regeneration)"),
    Attack("concept resurgence", "attack_resurgence", paper="concept resurgence (2024-2025)",
           what="the same LoRA trained on images of a kept, unrelated concept only; the erased one measured"),
    Attack("textual inversion", "attack_textual_inversion", nodes=("MemoRaTextualInversion",),
           concept_images=SEED_IMAGES, paper="Pham et al., ICLR 2024",
           what="a new token embedding learned on the concept images, the unlearned model frozen"),
    Attack("adversarial prompt", "attack_adversarial_prompt", nodes=("MemoRaAdversarialPrompt",),
           concept_images=SEED_IMAGES, paper="Zhang et al., ECCV 2024 (UnlearnDiffAtk)",
           what="prompt tokens optimised so the unlearned model's own denoising loss on the concept images is low"),
    Attack("concept vector", "attack_concept_vector", nodes=("MemoRaConceptVector",), knowledge=TEXT_ENCODER,
           paper="Tsai et al., ICLR 2024 (Ring-A-Bell)",
           what="a concept direction in text-embedding space added to the prompt"),
    Attack("noise-injection probe", "attack_noise_probe", nodes=("MemoRaNoiseInjectionProbe",),
           paper="When Are Concepts Erased From Diffusion Models? (NeurIPS 2025)",
           what="noise injected along the DDIM trajectory"),
    Attack("inpainting probe", "attack_inpainting_probe", nodes=("MemoRaInpaintingProbe",),
           concept_images=SEED_IMAGES, paper="When Are Concepts Erased From Diffusion Models? (NeurIPS 2025)",
           what="a partly masked concept image inpainted by the unlearned model"),
)
BY_NAME = {a.name: a for a in ATTACKS}
#: short names accepted by --attacks (lower case, '-' for spaces; 'automemora' for 'AutoMemoRa (w=2)')
ALIASES = {a.name.lower().split(" (")[0].replace(" ", "-"): a.name for a in ATTACKS}
BASELINE = ATTACKS[0].name


def resolve(names: Optional[str]) -> list[Attack]:
    """--attacks 'memora,direct-relearning' -> the attacks (always with the baseline, first); ValueError naming
    an unknown one and the choices. None or 'all': every attack."""
    if names is None or names.strip().lower() == "all":
        return list(ATTACKS)
    wanted, unknown = [], []
    for raw in (n.strip() for n in names.split(",") if n.strip()):
        key = raw.lower().replace(" ", "-").split("-(")[0]
        name = ALIASES.get(key) or BY_NAME.get(raw)
        if name is None:
            unknown.append(raw)
        elif name not in wanted:
            wanted.append(name)
    if unknown or not wanted:
        import difflib

        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u.lower(), ALIASES, 1)) else
                 repr(u) for u in unknown]
        raise ValueError(f"--attacks {names!r}: unknown attack {', '.join(hints) or '(none given)'}; expected a "
                         f"comma-separated list of {', '.join(ALIASES)} (or 'all')")
    return [a for a in ATTACKS if a.name == BASELINE or a.name in wanted]
