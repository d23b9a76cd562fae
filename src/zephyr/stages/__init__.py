"""The stages of the pipeline, one package each, every one entered through its `run` module."""
