"""`zephyr sft`: dSFT, supervised fine-tuning on conversations (`run`), on the shared training loop."""
