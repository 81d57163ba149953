"""MemoRa (Memory Self-Regeneration, arXiv 2510.03263) as plain torch code.

Nothing in this package imports ComfyUI: the ComfyUI glue lives in ``nodes/``. A denoiser is any callable
``eps_fn(x, sigma) -> eps`` in variance-exploding coordinates (``x = x0 + sigma * eps``, the coordinates ComfyUI
samples in), classifier-free guidance already applied.
"""

__version__ = "0.1.0"
