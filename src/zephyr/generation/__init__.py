"""Generation backends behind one protocol: transformers (local), OpenAI-compatible HTTP, vLLM.

`make_generator(spec, **options)` returns a `Generator` for a model spec; see `zephyr.generation.base`.
The factory lives here, above the backends, because every backend imports `base`: in `base` it would make
an import cycle.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from zephyr.core.errors import ZephyrError
from zephyr.generation.base import (
    DEFAULT_OPENAI_URL,
    Completion,
    Generator,
    Request,
    RequestGenerator,
    SamplingParams,
    TokenLogprob,
    Usage,
    group_by_conversation,
    parse_spec,
)
from zephyr.generation.local import LocalGenerator
from zephyr.generation.remote import RemoteGenerator
from zephyr.generation.vllm_backend import VLLMGenerator

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


def make_generator(spec: str, **options: Any) -> Generator:
    """A generator for a model spec; `options` go to the backend (unknown ones are an error naming them).

    transformers: chat_template, dtype, device, batch_size, trust_remote_code, attn_implementation.
    openai: api_key_env, max_concurrency, timeout, max_retries, backoff_base, backoff_max, cache, prices,
    requests_per_minute, tokens_per_minute.
    vllm: chat_template, dtype, tensor_parallel_size, gpu_memory_utilization, max_model_len, trust_remote_code.
    """
    parsed = parse_spec(spec)
    if parsed.backend == "openai":
        _check_options(RemoteGenerator, options, spec, skip=("model", "base_url"))
        return RemoteGenerator(parsed.model, parsed.base_url or DEFAULT_OPENAI_URL, **options)
    if parsed.backend == "vllm":
        _check_options(VLLMGenerator, options, spec, skip=("model",))
        return VLLMGenerator(parsed.model, **options)
    _check_options(LocalGenerator.from_spec, options, spec, skip=("spec",))
    return LocalGenerator.from_spec(parsed.model, **options)


def _check_options(
    factory: Callable[..., Any], options: Mapping[str, Any], spec: str, skip: Sequence[str]
) -> None:
    accepted = [
        name
        for name, p in inspect.signature(factory).parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name not in (*skip, "self", "cls")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ZephyrError(
            f"model {spec!r}: unknown generation option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
