"""Cache-aware placement's grouping key (memora_batch.backend.affinity_key): jobs that share the work upstream of
LoRA training share the key; anything upstream that differs separates them."""

from __future__ import annotations


from memora_batch.backend import affinity_key
from memora_batch.workflow import graph_key


def test_affinity_key_groups_jobs_by_their_upstream_work():
    base = {"1": {"class_type": "Seed", "inputs": {"text": "a"}},
            "2": {"class_type": "Invert", "inputs": {"x": ["1", 0]}},
            "3": {"class_type": "MemoRaLoRATrain", "inputs": {"latents": ["2", 0], "steps": 10}},
            "4": {"class_type": "Eval", "inputs": {"lora": ["3", 0], "seed": 1}}}
    other_eval = {**base, "4": {"class_type": "Eval", "inputs": {"lora": ["3", 0], "seed": 2}}}
    other_steps = {**base, "3": {**base["3"], "inputs": {**base["3"]["inputs"], "steps": 20}}}
    other_seed_text = {**base, "1": {"class_type": "Seed", "inputs": {"text": "b"}}}
    assert graph_key(base) != graph_key(other_eval)
    assert affinity_key(base) == affinity_key(other_eval) == affinity_key(other_steps)
    assert affinity_key(base) != affinity_key(other_seed_text)


def test_recovery_sweep_jobs_group_by_concept_not_by_evaluation_seed_or_steps():
    from batch_kit import example_workflow
    from memora_batch.workflow import apply_overrides

    wf = example_workflow("recovery_sweep", definitions=True)
    api = wf.api
    from batch_kit import DEFINITIONS

    def job(**ov):
        return apply_overrides(api, ov, DEFINITIONS, wf.aliases)

    a = job(**{"Evaluation seed.value": 1})
    assert affinity_key(a) == affinity_key(job(**{"Evaluation seed.value": 2})) \
        == affinity_key(job(**{"Train LoRA.steps": 7}))
    assert affinity_key(a) != affinity_key(job(**{"Concept prompt.value": "another concept"}))
