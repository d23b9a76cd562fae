"""Evaluation of a model: judged chat benchmarks and log-likelihood multiple choice.

Multiple choice (`zephyr eval mc`, lm-evaluation-harness semantics): `metrics` holds the pure per-item and
aggregate metrics, `presets` the Open LLM Leaderboard v1 task settings, `multiple_choice` the scoring and
the command. Nothing is imported here, so that importing one evaluation module never pulls in the others.
"""
