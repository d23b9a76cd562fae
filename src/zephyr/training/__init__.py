"""Training: one loop, SFT and DPO tasks, losses, checkpoints."""
