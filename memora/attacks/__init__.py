"""Recovery attacks other than MemoRa, as plain torch code (no ComfyUI import): textual inversion (Pham et al.
2023), an UnlearnDiffAtk-style adversarial prompt (Zhang et al. 2024), a Ring-A-Bell-style concept vector (Tsai et
al. 2024) and the sampling probes of Lu et al. (2025). ``nodes/attack_embeddings.py`` and ``nodes/attack_probes.py``
are their ComfyUI glue; docs/attack-embeddings.md and docs/attack-probes.md describe them, docs/attacks.md the
scoreboard."""
