"""Build-time code: what only the build and generator scripts use (the micro world's training loops, the UI-workflow
writer). ComfyUI never loads it and nothing under memora/, nodes/ or memora_batch/ imports it; it is not installed
with the pack (scripts put the repository root on sys.path)."""
