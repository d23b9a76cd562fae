"""The `eval` stage of a pipeline: every evaluation of every model of a run, and their sample answers."""
