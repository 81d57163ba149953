"""The MemoRa micro world: a miniature of the paper's setting that trains and runs on a CPU in minutes.

Five procedural shape concepts (``data``), a concept detector (``detector``), training loops for a tiny SD1.x-family
model and its ESD erasure (``diffusion``), the frozen text encoder (``text``) and the shipped files' facts
(``world``). Torch, numpy, Pillow (and transformers for the text encoder) only: nothing here imports ComfyUI; the
build script (scripts/build_micro_world.py) instantiates ComfyUI's own network classes and passes them in.
See docs/micro-world.md.
"""
