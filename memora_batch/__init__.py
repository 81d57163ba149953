"""Running ComfyUI graphs that use the MemoRa nodes: an embedded executor, and the ``memora-batch`` command."""
