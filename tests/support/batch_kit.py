"""memora-batch without ComfyUI, for the unit tier: the node definitions stored in tests/unit/batch_object_info.json
(checked against the installed nodes by tests/workflows/test_batch_contracts.py) and backends built on them."""

from __future__ import annotations

import json
from pathlib import Path

from memora_batch.backend import Backend, RunResult
from memora_batch.workflow import Workflow

ROOT = Path(__file__).resolve().parents[2]
DEFINITIONS = json.loads((ROOT / "tests" / "unit" / "batch_object_info.json").read_text())


class StoredDefinitions(Backend):
    """A backend that knows the stored node definitions and runs nothing (planning only)."""

    def describe(self) -> str:
        return "the stored node definitions"

    def available_types(self) -> set:
        return set(DEFINITIONS)

    def object_info(self, node_types) -> dict:
        return {t: DEFINITIONS[t] for t in node_types if t in DEFINITIONS}


class Instant(StoredDefinitions):
    """Every job it runs succeeds at once; ``ran`` lists the graphs in order, ``runs`` counts each distinct graph."""

    def __init__(self):
        self.ran: list[dict] = []
        self.runs: dict[str, int] = {}

    def describe(self) -> str:
        return "an instant backend"

    def run(self, prompt: dict, timeout=None) -> RunResult:
        self.ran.append(prompt)
        key = json.dumps(prompt, sort_keys=True)
        self.runs[key] = self.runs.get(key, 0) + 1
        return RunResult(f"p{len(self.ran)}", True, {}, None, "instant")

    def resolve_file(self, item: dict) -> str:
        return item["filename"]

    def resolve_lora(self, name: str) -> str:
        return name


def example_workflow(name: str, definitions: bool = False) -> Workflow:
    """A shipped example workflow; with ``definitions``, converted to API format against the stored definitions."""
    wf = Workflow.load(ROOT / "example_workflows" / f"{name}.json")
    if definitions:
        wf.to_api(DEFINITIONS)
    return wf
