"""PiSA-SR core: plain torch functions over tensors (no ComfyUI import), shared by the nodes, CLI and tests."""
