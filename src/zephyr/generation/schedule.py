"""Model-major scheduling: the generators of a stage built from their configs, one local model at a time.

A stage that answers prompts with several models (the feedback pool and its judge; a teacher and a user
simulator) asks `Resident.get(config)` for each model when it needs it. Local models (transformers, vLLM)
are resident one at a time: asking for another first releases the one held (`close()`: its weights and
GPU memory are returned), so the peak memory of a stage is that of its largest model, not the sum, and at
most one vLLM engine lives in the process. The stage orders its work so that each model is loaded once
and answers everything assigned to it before the next loads. HTTP generators hold no weights: they are
built once and kept, and may run while a local model works.

`backend_options` is the one place that turns a `GeneratorConfig` into the options of its backend.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from zephyr.core.config import GeneratorConfig
from zephyr.generation import make_generator
from zephyr.generation.base import Generator, Metered, Releasable, parse_spec
from zephyr.generation.cache import request_cache_options

Build = Callable[[GeneratorConfig], Generator]


def is_local(gcfg: GeneratorConfig) -> bool:
    """Whether the config's model runs in this process (its weights in memory): transformers and vLLM."""
    return parse_spec(gcfg.model).backend != "openai"


def backend_options(gcfg: GeneratorConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """The `make_generator` options a generator config sets for its backend. HTTP answers are stored in the
    run's request cache (`request_cache_options`) unless `gcfg.cache` is off or no folder is given."""
    backend = parse_spec(gcfg.model).backend
    if backend == "openai":
        options: dict[str, Any] = {
            "api_key_env": gcfg.api_key_env,
            "max_concurrency": gcfg.max_concurrency,
            "timeout": gcfg.timeout,
            "max_retries": gcfg.max_retries,
            "requests_per_minute": gcfg.requests_per_minute,
            "tokens_per_minute": gcfg.tokens_per_minute,
        }
        return options | request_cache_options(gcfg.model, output_dir, gcfg.cache)
    dtype = None if gcfg.dtype == "auto" else gcfg.dtype
    if backend == "vllm":
        return {
            "dtype": gcfg.dtype,
            "tensor_parallel_size": gcfg.tensor_parallel_size,
            "gpu_memory_utilization": gcfg.gpu_memory_utilization,
            "max_model_len": gcfg.max_model_len,
        }
    return {"batch_size": gcfg.batch_size} | ({"dtype": dtype} if dtype is not None else {})


def load_key(gcfg: GeneratorConfig, output_dir: str | Path | None = None) -> Hashable:
    """Configs with the same key share one generator (one copy of the weights): same model, same options."""
    return (gcfg.model, tuple(sorted(backend_options(gcfg, output_dir).items())))


def answers_id(gcfg: GeneratorConfig) -> str:
    """What names a local model's answers in a stage's answer cache (`CachedGenerator`): its spec, and its
    dtype when one is set (the batch size changes no answer: sampling is seeded per request)."""
    return gcfg.model if gcfg.dtype == "auto" else f"{gcfg.model}|{gcfg.dtype}"


def builder(output_dir: str | Path | None = None) -> Build:
    """Builds a config's generator with `make_generator` and the config's backend options."""

    def build(gcfg: GeneratorConfig) -> Generator:
        return make_generator(gcfg.model, **backend_options(gcfg, output_dir))

    return build


def release(generator: Generator) -> None:
    """Free what a generator holds (`close()` where it has one), then collect: the weights go now."""
    if isinstance(generator, Releasable):
        generator.close()
    gc.collect()


class Resident:
    """The generators of a stage, built on first use (module docstring): at most one local one alive.

    `key(config)` says which configs share an instance (`load_key`, by default). `loads` lists the keys in
    the order their models were built; `usage()` is the usage of every generator used so far by model id,
    the released ones included.
    """

    def __init__(self, build: Build, key: Callable[[GeneratorConfig], Hashable] = load_key):
        self._build = build
        self.key = key
        self._local: tuple[Hashable, Generator] | None = None
        self._remote: dict[Hashable, Generator] = {}
        self._usage: dict[str, dict[str, Any]] = {}
        self.loads: list[Hashable] = []

    def get(self, gcfg: GeneratorConfig) -> Generator:
        key = self.key(gcfg)
        if not is_local(gcfg):
            if key not in self._remote:
                self._remote[key] = self._build(gcfg)
            return self._remote[key]
        if self._local is not None and self._local[0] == key:
            return self._local[1]
        self.release()  # before the next one loads: one model's memory at a time
        generator = self._build(gcfg)
        self.loads.append(key)
        self._local = (key, generator)
        return generator

    def holds(self, gcfg: GeneratorConfig) -> bool:
        """Whether this config's local model is the one loaded now."""
        return self._local is not None and self._local[0] == self.key(gcfg)

    def release(self) -> None:
        """Release the local generator held, if any (its usage is kept)."""
        if self._local is None:
            return
        _, generator = self._local
        self._local = None
        _add(self._usage, generator)
        release(generator)

    def close(self) -> None:
        self.release()
        for generator in self._remote.values():
            _add(self._usage, generator)
            release(generator)
        self._remote.clear()

    def usage(self) -> dict[str, dict[str, Any]]:
        live = [*([self._local[1]] if self._local else []), *self._remote.values()]
        usage = dict(self._usage)
        for generator in live:
            _add(usage, generator)
        return usage

    def __enter__(self) -> Resident:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _add(usage: dict[str, dict[str, Any]], generator: Generator) -> None:
    if not isinstance(generator, Metered):
        return
    name, value = str(generator.model_id), generator.usage.to_dict()
    if name not in usage:
        usage[name] = value
        return
    total = dict(usage[name])
    for field, number in value.items():
        if isinstance(number, int | float) and isinstance(total.get(field), int | float):
            total[field] = total[field] + number
        elif number is not None:
            total[field] = number
    usage[name] = total
