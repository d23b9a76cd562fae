"""`zephyr eval alpaca-eval` (`run`): alpaca_eval's annotators, parsers and win rates in `protocol`."""
