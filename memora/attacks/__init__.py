"""Recovery attacks other than MemoRa, as plain torch code (no ComfyUI import); the nodes in ``nodes/`` wrap them:
textual inversion (Pham et al. 2023) and an UnlearnDiffAtk-style adversarial prompt (Zhang et al. 2024) in
``nodes/attack_embeddings.py`` (docs/attack-embeddings.md), the concept vector and the sampling probes in
``nodes/attack_probes.py`` (docs/attack-probes.md)."""
