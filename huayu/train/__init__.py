"""Training: one loop (loop.py) and the stages that feed it (pretrain.py, sft.py)."""
