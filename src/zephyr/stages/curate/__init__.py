"""`zephyr curate`: the dSFT train and test sets (`run`), through the pure filters of `filters`."""
