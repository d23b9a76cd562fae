"""Generation backends behind one protocol: transformers (local), OpenAI-compatible HTTP, vLLM.

`make_generator(spec, **options)` returns a `Generator` for a model spec; see `zephyr.generation.base`.
"""

from zephyr.generation.base import (
    Completion,
    Generator,
    Request,
    RequestGenerator,
    SamplingParams,
    TokenLogprob,
    Usage,
    group_by_conversation,
    make_generator,
    parse_spec,
)

__all__ = [
    "Completion",
    "Generator",
    "Request",
    "RequestGenerator",
    "SamplingParams",
    "TokenLogprob",
    "Usage",
    "group_by_conversation",
    "make_generator",
    "parse_spec",
]
