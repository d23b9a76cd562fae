"""`zephyr eval mt-bench` (`run`): FastChat's judge prompts, parsing and aggregation in `protocol`, the
results page and plot in `report`."""
