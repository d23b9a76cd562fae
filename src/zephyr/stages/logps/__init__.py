"""`zephyr logps`: per-pair sequence log-probs of a model on a preference file."""
