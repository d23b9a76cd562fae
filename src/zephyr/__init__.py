"""zephyr: direct distillation of LM alignment, end to end."""

__version__ = "0.1.0"
