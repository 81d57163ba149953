"""Names that several parts of the pack must spell alike, defined once.

- **Node titles** of the shipped workflows that memora-batch addresses (``--models micro``, ``--original``,
  ``--concept``, the prompt-CSV convention, the demo's headline metrics) and that scripts/make_*workflows.py write.
  Users keep these titles when they edit a workflow; docs/workflows.md lists them.
- **UI payload keys** the nodes return in their UI output (read by memora-batch's results and by web/memora.js).
- **Event names** the nodes send to the front end (web/memora.js listens to them).
- **Node type ids** that the runner or the front end name.

web/memora.js holds a copy of :func:`frontend_contract` in a marked JSON block (no build step for the front end);
tests/unit/test_batch_contracts.py fails when the two differ. Standard library only."""

from __future__ import annotations

# -- node titles (the addresses memora-batch uses) --------------------------------------------------------------------
TITLE_ORIGINAL_MODEL = "Original model"
TITLE_UNLEARNED_MODEL = "Unlearned model"
TITLE_NEVER_LEARNED_MODEL = "Never-learned model"
TITLE_CONCEPT_PROMPT = "Concept prompt"
TITLE_TRAIN_LORA = "Train LoRA"
TITLE_SEED_IMAGE_SIZE = "Seed image size"
TITLE_EVALUATION_PROMPT = "Evaluation prompt"
TITLE_EVALUATION_SEED = "Evaluation seed"
TITLE_EVALUATION_GUIDANCE = "Evaluation guidance"
TITLE_EVALUATION_IMAGE_SIZE = "Evaluation image size"
#: fallback of the prompt-CSV convention (a single sampler titled so); no shipped workflow has one
TITLE_EVALUATION_SAMPLER = "Evaluation sampler"
#: prefixes of per-model titles: "Concept score (recovered)", "Similarity to original (unlearned)", "Evaluate original"
TITLE_CONCEPT_SCORE = "Concept score"
TITLE_SIMILARITY = "Similarity to original"
TITLE_EVALUATE = "Evaluate"

#: the models the recovery workflows evaluate, in the order they are shown
EVALUATED_MODELS = ("original", "unlearned", "recovered")
#: model variant (``--original`` / ``--unlearned`` / the micro world's variants) -> the title of its loader
MODEL_TITLES = {"original": TITLE_ORIGINAL_MODEL, "unlearned": TITLE_UNLEARNED_MODEL,
                "never_learned": TITLE_NEVER_LEARNED_MODEL}


def concept_score_title(model: str) -> str:
    """'Concept score (recovered)': the concept detector's node for one evaluated model."""
    return f"{TITLE_CONCEPT_SCORE} ({model})"


def similarity_title(model: str) -> str:
    """'Similarity to original (recovered)': a model's images against the original model's."""
    return f"{TITLE_SIMILARITY} ({model})"


def evaluate_title(model: str) -> str:
    """'Evaluate recovered': the sampler that draws a model's evaluation images."""
    return f"{TITLE_EVALUATE} {model}"


#: every title memora_recovery.json and recovery_sweep.json must have (the demo and ``--models micro`` set them)
RECOVERY_WORKFLOW_TITLES = (
    TITLE_ORIGINAL_MODEL, TITLE_UNLEARNED_MODEL, TITLE_CONCEPT_PROMPT, TITLE_TRAIN_LORA, TITLE_SEED_IMAGE_SIZE,
    TITLE_EVALUATION_PROMPT, TITLE_EVALUATION_SEED, TITLE_EVALUATION_GUIDANCE, TITLE_EVALUATION_IMAGE_SIZE,
    *(evaluate_title(m) for m in EVALUATED_MODELS), *(concept_score_title(m) for m in EVALUATED_MODELS),
    *(similarity_title(m) for m in ("recovered", "unlearned")),
)

# -- UI payload keys (a node's ``ui`` output) --------------------------------------------------------------------------
UI_SCORES = "memora_scores"  # [{title, columns, rows}]: score tables
UI_LORA = "memora_lora"  # [file name in models/loras]: a saved LoRA
UI_LOSS = "memora_loss"  # [{step, loss, lr}]: the training loss curve

# -- events sent to the front end (PromptServer.send_sync) -----------------------------------------------------------
EVENT_PROGRESS = "memora.progress"  # {node, stage, step, total, ...}
EVENT_TRAIN = "memora.train"  # {node, step, total, loss, lr, ...}
EVENT_LORA_SAVED = "memora.lora_saved"  # {node, filename}
EVENT_SCORES = "memora.scores"  # {node, title, columns, rows}

# -- node type ids named outside their own module --------------------------------------------------------------------
NODE_PREFIX = "MemoRa"
NODE_LORA_TRAIN = "MemoRaLoRATrain"
NODE_MICRO_WORLD = "MemoRaLoadMicroWorld"
NODE_MICRO_DETECTOR = "MemoRaMicroDetector"


def frontend_contract() -> dict:
    """What web/memora.js needs, as the JSON block it carries between ``/* memora-contract */`` markers."""
    return {
        "nodes": {"prefix": NODE_PREFIX, "train": NODE_LORA_TRAIN},
        "ui": {"scores": UI_SCORES, "lora": UI_LORA, "loss": UI_LOSS},
        "events": {"progress": EVENT_PROGRESS, "train": EVENT_TRAIN, "lora_saved": EVENT_LORA_SAVED,
                   "scores": EVENT_SCORES},
    }
