"""The MemoRa micro world: a miniature of the paper's setting that trains and runs on a CPU in minutes.

Five procedural shape concepts (``data``), the concept detector's network and rates (``detector``), the frozen text
encoder (``text``) and the shipped files' facts (``world``): what the nodes and the batch runner use at run time.
Torch, numpy, Pillow (and transformers for the text encoder) only: nothing here imports ComfyUI. The training loops
that made the shipped weights (UNets, ESD erasure, text-encoder pretraining, detector training) are build-only and
live in ``memora_build`` (used by scripts/build_micro_world.py, which instantiates ComfyUI's own network classes).
See docs/micro-world.md.
"""
