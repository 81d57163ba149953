"""Recovery attacks other than MemoRa, as plain torch code (no ComfyUI import); the nodes in ``nodes/`` wrap them."""
