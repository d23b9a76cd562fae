"""`zephyr dpo`: dDPO on the shared training loop (`run`), against the reference log-probs of `reference`."""
