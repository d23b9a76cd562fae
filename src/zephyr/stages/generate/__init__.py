"""`zephyr generate`: teacher-written dSFT dialogues (`run`), from the strategies in `strategies` (pure)."""
