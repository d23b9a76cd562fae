"""The vLLM backend (`vllm:PATH_OR_HUB_ID`): offline batched generation on GPUs, for large teachers.

vLLM is an optional extra (`pip install 'zephyr[vllm]'`), imported only when such a generator is built.
The prompt is rendered with the same chat template zephyr uses elsewhere, and generation stops at the
template's end-of-turn token as well as the model's EOS.

One engine lives in a process at a time: an engine takes a fixed share of every GPU's memory
(`gpu_memory_utilization`) and its distributed state, so a second one would not fit beside it.
Building a generator while another is alive is an error; `close()` (or leaving a `with` block) shuts the
engine down and returns its GPU memory, after which the next may be built.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
from collections.abc import Sequence
from typing import Any

from zephyr.core.errors import ZephyrError
from zephyr.data import chat
from zephyr.generation.base import (
    Completion,
    Conversation,
    FinishReason,
    Request,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from zephyr.models import load as models

# vLLM's finish reasons that end a usable completion ("abort" and the rest fail it)
_FINISHED: dict[str | None, FinishReason] = {"stop": "stop", "length": "length"}


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ZephyrError(
            "the vllm backend needs the `vllm` extra: pip install 'zephyr[vllm]' (a CUDA machine)"
        ) from exc
    return vllm


_alive: list[VLLMGenerator] = []  # the engine of this process, while it lives


class VLLMGenerator:
    """A `Generator` over `vllm.LLM` in this process (one alive at a time: module docstring)."""

    model_id: str

    def __init__(
        self,
        model: str,
        *,
        chat_template: str = "auto",
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
    ):
        vllm = import_vllm()
        if _alive:
            raise ZephyrError(
                f"vllm:{model}: the engine of {_alive[0].model_id} is still alive in this process; close() "
                "it first (one vLLM engine at a time)"
            )
        path = models.resolve_model_path(model)
        self.model_id = f"vllm:{model}"
        self.usage = Usage()
        self.tokenizer = models.load_tokenizer(
            model, chat_template=chat_template, trust_remote_code=trust_remote_code
        )
        _, self.end_of_turn_id = chat.end_of_turn(self.tokenizer)
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=path,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            trust_remote_code=trust_remote_code,
        )
        _alive.append(self)

    def close(self) -> None:
        """Shut the engine down and return its GPU memory (idempotent)."""
        if self.llm is None:
            return
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        with contextlib.suppress(Exception):  # vLLM versions differ in what there is to shut down
            if callable(shutdown := getattr(engine_core, "shutdown", None)):
                shutdown()
        self.llm = None
        if self in _alive:
            _alive.remove(self)
        with contextlib.suppress(Exception):
            state = importlib.import_module("vllm.distributed.parallel_state")
            state.destroy_model_parallel()
            state.destroy_distributed_environment()
        gc.collect()
        with contextlib.suppress(Exception):
            torch = importlib.import_module("torch")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __enter__(self) -> VLLMGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[Completion]:
        grouped = self.generate_requests([Request(c, params) for c in conversations])
        return [c for choices in grouped for c in choices]

    def generate_requests(self, requests: Sequence[Request]) -> list[list[Completion]]:
        """Streaming callbacks get the whole text at once: vLLM's offline API does not stream."""
        try:
            grouped = self._run(requests)
        except Exception:
            # One bad request (too long, bad template input) fails vLLM's whole call: retry one by one so
            # that only the bad ones fail.
            grouped = [self._run_one(r) for r in requests]
        for request, choices in zip(requests, grouped, strict=True):
            if request.on_text is not None:
                for k, completion in enumerate(choices):
                    request.on_text(k, completion.text)
            self.usage.requests += len(choices)
            self.usage.failures += sum(not c.ok for c in choices)
            self.usage.prompt_tokens += sum(c.prompt_tokens for c in choices)
            self.usage.completion_tokens += sum(c.completion_tokens for c in choices)
        return grouped

    def _run_one(self, request: Request) -> list[Completion]:
        try:
            return self._run([request])[0]
        except Exception as exc:
            return [Completion.failed(f"{type(exc).__name__}: {exc}") for _ in range(request.params.n)]

    def _run(self, requests: Sequence[Request]) -> list[list[Completion]]:
        if self.llm is None:
            raise ZephyrError(f"{self.model_id}: the engine was closed")
        outputs = self.llm.chat(
            [[dict(m) for m in r.messages] for r in requests],
            [self._sampling_params(r.params) for r in requests],
            use_tqdm=False,
            chat_template=self.tokenizer.chat_template,
            add_generation_prompt=True,
        )
        stop_ids = {self.end_of_turn_id, self.tokenizer.eos_token_id}
        return [
            completions_from_output(o, r.params, stop_ids) for o, r in zip(outputs, requests, strict=True)
        ]

    def _sampling_params(self, params: SamplingParams) -> Any:
        return self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=[self.end_of_turn_id],
            logprobs=params.top_logprobs if params.logprobs else None,
            skip_special_tokens=True,
        )


def completions_from_output(
    output: Any, params: SamplingParams, stop_token_ids: Any = ()
) -> list[Completion]:
    """Completions from one vLLM RequestOutput (its `outputs`, by index).

    As in the local backend, a final end-of-turn token counts as generated but has no log-prob entry (its
    text is not part of the completion).
    """
    prompt_tokens = len(output.prompt_token_ids or [])
    completions = []
    for choice in sorted(output.outputs, key=lambda c: c.index):
        finish = _FINISHED.get(choice.finish_reason)
        if finish is None:
            completions.append(
                Completion.failed(f"vLLM finish_reason {choice.finish_reason!r}", prompt_tokens)
            )
            continue
        completions.append(
            Completion(
                text=choice.text,
                finish_reason=finish,
                prompt_tokens=prompt_tokens,
                completion_tokens=len(choice.token_ids),
                logprobs=_logprobs(choice, params, stop_token_ids) if params.logprobs else None,
            )
        )
    return completions


def _logprobs(choice: Any, params: SamplingParams, stop_token_ids: Any) -> list[TokenLogprob] | None:
    """vLLM gives, per position, {token_id: Logprob(logprob, rank, decoded_token)} holding the top-k and the
    chosen token."""
    if choice.logprobs is None:
        return None
    token_ids = list(choice.token_ids)
    if token_ids and token_ids[-1] in stop_token_ids and choice.finish_reason == "stop":
        token_ids.pop()
    entries: list[TokenLogprob] = []
    for token_id, candidates in zip(token_ids, choice.logprobs, strict=False):
        chosen = candidates[token_id]
        ranked = sorted(candidates.values(), key=lambda lp: -lp.logprob)[: params.top_logprobs]
        entries.append(
            {
                "token": chosen.decoded_token or "",
                "logprob": float(chosen.logprob),
                "top_logprobs": [
                    {"token": lp.decoded_token or "", "logprob": float(lp.logprob)} for lp in ranked
                ],
            }
        )
    return entries
