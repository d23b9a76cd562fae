"""`zephyr eval mc` (`run`): log-likelihood multiple choice with lm-evaluation-harness semantics; the pure
metrics in `metrics`, the Open LLM Leaderboard v1 settings in `presets`."""
