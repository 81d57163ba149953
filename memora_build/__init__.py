"""Build-time code: what only the build and generator scripts use. ComfyUI never loads it, nothing under memora/,
nodes/ or memora_batch/ imports it, it is not installed with the pack (pyproject's package list) and `comfy node
pack` leaves it out (.comfyignore); scripts put the repository root on sys.path.

- ``micro_diffusion``: the micro world's UNet training (eps objective, EMA), DDIM sampling and ESD erasure;
- ``micro_text``: the micro world's text encoder, seeded and pretrained;
- ``micro_detector``: the micro world's concept-detector training and scoring.
All used by scripts/build_micro_world.py."""
