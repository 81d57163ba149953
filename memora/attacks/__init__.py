"""Recovery attacks other than MemoRa, as plain torch code (no ComfyUI import): textual inversion (Pham et al.
2023) and an UnlearnDiffAtk-style adversarial prompt (Zhang et al. 2024). ``nodes/attack_embeddings.py`` is their
ComfyUI glue; docs/attack-embeddings.md describes both."""
