"""The transformers backend: batched generation with a model in this process (CPU or one GPU).

Each conversation is rendered once with the tokenizer's chat template (with the generation prompt). Requests
are sorted by prompt length and cut into static left-padded batches; a decoding loop of our own runs each
batch with a KV cache, so that every row keeps its own parameters (greedy or sampled, its own seed, stop
strings, token limit) and rows that finish early leave the batch. A row stops at the chat template's
end-of-turn token or the tokenizer's EOS (neither is part of the returned text), at a stop string, or after
`max_tokens` tokens (finish_reason "length").

Log-probabilities are those of the model itself (before temperature and top-p), as vLLM reports them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from zephyr.core.errors import ZephyrError
from zephyr.generation.base import (
    Completion,
    Conversation,
    Request,
    SamplingParams,
    TokenLogprob,
    Usage,
)

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class _Row:
    """One completion being generated: its prompt, parameters and the state of its decoding."""

    request: int
    choice: int
    prompt: list[int]
    params: SamplingParams
    limit: int  # tokens it may generate: max_tokens, or less where the context ends first
    seed: int | None
    on_text: Callable[[str], None] | None
    tokens: list[int] = field(default_factory=list)  # visible tokens (no end-of-turn)
    generated: int = 0  # tokens produced, the end-of-turn token included
    logprobs: list[TokenLogprob] | None = None
    finish: str | None = None
    text: str | None = None  # set once a stop string cut the text
    emitted: int = 0  # characters already streamed
    rng: Any = None  # torch.Generator for sampled rows

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0


class LocalGenerator:
    """A `Generator` over a transformers causal LM and its tokenizer (with the chat template to use)."""

    def __init__(self, model: Any, tokenizer: Any, *, model_id: str = "local", batch_size: int = 16):
        from zephyr.models import load as models

        if batch_size < 1:
            raise ZephyrError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.batch_size = batch_size
        self.usage = Usage()
        _, eot_id = models.end_of_turn(tokenizer)
        self.stop_token_ids = frozenset(_stop_ids(eot_id, tokenizer, model))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else eot_id
        self.max_context: int | None = getattr(model.config, "max_position_embeddings", None)
        self._model_lock = threading.Lock()
        # Fast tokenizers are not safe to share between threads (the server renders prompts in its handler
        # threads while the worker decodes).
        self._tokenizer_lock = threading.RLock()
        self._token_text: dict[int, str] = {}
        self._cache_kwarg = _cache_kwarg(model)

    @classmethod
    def from_spec(
        cls,
        spec: str,
        *,
        chat_template: str = "auto",
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ) -> LocalGenerator:
        """Load `asset:NAME`, `transformers:PATH_OR_HUB_ID` or a path. dtype: float32 on CPU, bfloat16 on CUDA."""
        import torch

        from zephyr.models import load as models

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is not None and dtype not in _DTYPES:
            raise ZephyrError(f"dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
        torch_dtype = getattr(torch, dtype or ("float32" if device == "cpu" else "bfloat16"))
        tokenizer = models.load_tokenizer(
            spec, chat_template=chat_template, trust_remote_code=trust_remote_code
        )
        model = models.load_model(
            spec,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
        return cls(model.to(device), tokenizer, model_id=spec, batch_size=batch_size)

    # -----------------------------------------------------------------------------------------------------
    # Public API

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[Completion]:
        grouped = self.generate_requests([Request(c, params) for c in conversations])
        return [c for choices in grouped for c in choices]

    def generate_requests(self, requests: Sequence[Request]) -> list[list[Completion]]:
        """One list of `params.n` completions per request; requests may carry different parameters."""
        import torch

        rows, failed = self._rows(requests)
        with self._model_lock, torch.inference_mode():
            for batch in self._batches(rows):
                try:
                    self._run_batch(batch)
                except Exception as exc:  # e.g. out of memory: the batch's rows fail, the others go on
                    for row in batch:
                        if row.finish is None:
                            failed[(row.request, row.choice)] = Completion.failed(
                                f"{type(exc).__name__}: {exc}", prompt_tokens=len(row.prompt)
                            )
        out: list[list[Completion | None]] = [[None] * r.params.n for r in requests]
        for key, completion in failed.items():
            out[key[0]][key[1]] = completion
        for row in rows:
            if (row.request, row.choice) not in failed:
                out[row.request][row.choice] = self._completion(row)
        self._account([c for choices in out for c in choices if c is not None])
        return [[c for c in choices if c is not None] for choices in out]

    def next_token_logprobs(
        self,
        conversations: Sequence[Conversation],
        top_k: int = 20,
        *,
        candidates: Sequence[str] = (),
        answer_prefix: str = "",
    ) -> list[dict[str, float]]:
        """Log-probabilities of the next token after the generation prompt (and `answer_prefix`).

        Each dict maps token text to log-probability for the `top_k` most likely tokens plus every string in
        `candidates` (each must be one token, e.g. rating digits), most likely first. Tokens that decode to
        the same text are merged (their probabilities added).
        """
        found = self.prefix_logprobs(conversations, [answer_prefix], top_k, candidates=candidates)
        return [tops[0] for tops in found]

    def prefix_logprobs(
        self,
        conversations: Sequence[Conversation],
        prefixes: Sequence[str],
        top_k: int = 20,
        *,
        candidates: Sequence[str] = (),
    ) -> list[list[dict[str, float]]]:
        """`next_token_logprobs` after each of `prefixes`, for every conversation: [conversation][prefix].

        A judge asks for the rating of answer 1, 2, ... of one long prompt: each conversation is a group of
        `zephyr.scoring.continuations`, the tokens its prompts share (the prompt) as the prefix, run once,
        and the rest of each prompt as a continuation, whose next-token distribution is read. Same numbers
        as one forward per prompt, up to float rounding.
        """
        import torch

        from zephyr.scoring.continuations import score_groups

        if not prefixes:
            return [[] for _ in conversations]
        candidate_ids = {text: self._single_token_id(text) for text in candidates}
        groups = []
        for i, conversation in enumerate(conversations):
            rows = [self._prompt_ids(conversation, prefix) for prefix in prefixes]
            longest, shortest = max(len(r) for r in rows), min(len(r) for r in rows)
            if self.max_context is not None and longest > self.max_context:
                raise ZephyrError(
                    f"conversation {i}: {longest} tokens exceed the context of {self.max_context}"
                )
            if shortest < 2:
                raise ZephyrError(
                    f"conversation {i}: a prompt of {shortest} token has no token before its last"
                )
            groups += _branch_groups(rows)
        with self._model_lock:
            after = score_groups(self.model, groups, batch_size=self.batch_size, next_token=True).next_logps
        assert after is not None
        k = min(top_k, after.shape[-1])
        top_v, top_i = after.topk(k, dim=-1) if k > 0 else (after[:, :0], after[:, :0].to(torch.long))
        tops = [
            self._merge_by_text(
                zip(top_i[j].tolist(), top_v[j].tolist(), strict=True), after[j], candidate_ids
            )
            for j in range(len(after))
        ]
        return [tops[i * len(prefixes) : (i + 1) * len(prefixes)] for i in range(len(conversations))]

    def count_prompt_tokens(self, messages: Conversation) -> int:
        return len(self._prompt_ids(messages))

    def check_request(self, messages: Conversation, params: SamplingParams) -> str | None:
        """Why this request cannot be served (a template error, a prompt longer than the context), or None."""
        try:
            n = self.count_prompt_tokens(messages)
        except ZephyrError as exc:
            return str(exc)
        return self._context_problem(n)

    # -----------------------------------------------------------------------------------------------------
    # Preparing rows

    def _rows(self, requests: Sequence[Request]) -> tuple[list[_Row], dict[tuple[int, int], Completion]]:
        rows: list[_Row] = []
        failed: dict[tuple[int, int], Completion] = {}
        for i, request in enumerate(requests):
            params = request.params
            try:
                prompt = self._prompt_ids(request.messages)
            except ZephyrError as exc:
                failed.update({(i, k): Completion.failed(str(exc)) for k in range(params.n)})
                continue
            problem = self._context_problem(len(prompt))
            if problem:
                failed.update({(i, k): Completion.failed(problem, len(prompt)) for k in range(params.n)})
                continue
            room = self.max_context - len(prompt) if self.max_context is not None else params.max_tokens
            base_seed = params.seed if params.seed is not None or params.temperature == 0 else _fresh_seed()
            for k in range(params.n):
                rows.append(
                    _Row(
                        request=i,
                        choice=k,
                        prompt=prompt,
                        params=params,
                        limit=min(params.max_tokens, room),
                        seed=None if base_seed is None else base_seed + k,
                        on_text=_bind_choice(request.on_text, k),
                        logprobs=[] if params.logprobs else None,
                    )
                )
        return rows, failed

    def _context_problem(self, prompt_tokens: int) -> str | None:
        if self.max_context is not None and prompt_tokens >= self.max_context:
            return f"the prompt has {prompt_tokens} tokens; the model's context is {self.max_context} tokens"
        return None

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        # Longest first: similar lengths share a batch (little padding), and memory trouble shows at once.
        ordered = sorted(rows, key=lambda r: -len(r.prompt))
        return [ordered[i : i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]

    def _prompt_ids(self, messages: Conversation, answer_prefix: str = "") -> list[int]:
        from zephyr.data import chat

        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            raise ZephyrError("a conversation must be a non-empty list of {role, content} messages")
        with self._tokenizer_lock:
            text = chat.render_text(self.tokenizer, messages, add_generation_prompt=True)
            return chat.encode_text(self.tokenizer, text + answer_prefix)

    def _single_token_id(self, text: str) -> int:
        with self._tokenizer_lock:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ZephyrError(
                f"candidate {text!r} is {len(ids)} tokens for this tokenizer; it must be one token"
            )
        return ids[0]

    # -----------------------------------------------------------------------------------------------------
    # The decoding loop

    def _prefill(self, prompts: list[list[int]]) -> tuple[Any, Any, Any]:
        """Next-token logits after each left-padded prompt [B, V] (fp32), the filled cache, the padding mask."""
        import torch

        device = self.model.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        mask = mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return (*self._forward(ids.to(device), mask, positions, cache=None), mask)

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any) -> tuple[Any, Any]:
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True}
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        out = self.model(**kwargs, logits_to_keep=1)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.logits[:, -1, :].float(), new_cache

    def _run_batch(self, rows: list[_Row]) -> None:
        import torch

        device = self.model.device
        for row in rows:
            if not row.greedy:
                row.rng = torch.Generator(device=device).manual_seed(row.seed)
        logits, cache, mask = self._prefill([r.prompt for r in rows])
        positions = mask.sum(-1) - 1
        live = list(rows)  # the rows in the tensors, in tensor order (finished ones until pruned)
        while True:
            tokens = self._step(logits, live)
            if all(r.finish is not None for r in live):
                return
            keep = [j for j, r in enumerate(live) if r.finish is None]
            next_ids = torch.tensor(tokens, device=device)
            if _worth_pruning(len(keep), len(live)) and _prunable(cache):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                live, next_ids, positions, mask = (
                    [live[j] for j in keep],
                    next_ids[index],
                    positions[index],
                    mask[index],
                )
            positions = positions + 1
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
            logits, cache = self._forward(next_ids[:, None], mask, positions[:, None], cache)

    def _step(self, logits: Any, live: list[_Row]) -> list[int]:
        """Choose each live row's next token, record it, and return the tokens (pad for finished rows)."""
        import torch

        need_logprobs = any(r.params.logprobs and r.finish is None for r in live)
        logp = torch.log_softmax(logits, dim=-1) if need_logprobs else None
        k = max((r.params.top_logprobs for r in live if r.finish is None), default=0)
        top = logp.topk(k, dim=-1) if logp is not None and k else None
        tokens = logits.argmax(dim=-1).tolist()
        for j, row in enumerate(live):
            if row.finish is not None:
                tokens[j] = self.pad_id
                continue
            if not row.greedy:
                tokens[j] = sample_token(logits[j], row.params.temperature, row.params.top_p, row.rng)
            entry = None
            if row.params.logprobs and logp is not None:
                entry = self._logprob_entry(tokens[j], logp[j], top, j, row.params.top_logprobs)
            self._accept(row, tokens[j], entry)
        return tokens

    def _logprob_entry(self, token: int, logp_row: Any, top: Any, j: int, k: int) -> TokenLogprob:
        alternatives = []
        if top is not None and k:
            ids, values = top.indices[j, :k].tolist(), top.values[j, :k].tolist()
            alternatives = [
                {"token": self._text_of(i), "logprob": v} for i, v in zip(ids, values, strict=True)
            ]
        return {
            "token": self._text_of(token),
            "logprob": float(logp_row[token]),
            "top_logprobs": alternatives,
        }

    def _accept(self, row: _Row, token: int, entry: TokenLogprob | None) -> None:
        row.generated += 1
        if token in self.stop_token_ids:
            row.finish = "stop"
        else:
            row.tokens.append(token)
            if entry is not None and row.logprobs is not None:
                row.logprobs.append(entry)
            if row.params.stop:
                self._check_stop_strings(row)
        if row.finish is None and row.generated >= row.limit:
            row.finish = "length"
        if row.on_text:
            self._stream(row)

    def _check_stop_strings(self, row: _Row) -> None:
        text = self._decode(row.tokens)
        cut = first_stop(text, row.params.stop)
        if cut is None:
            return
        row.text, row.finish = text[:cut], "stop"
        # Keep the tokens (and log-probs) whose text lies wholly before the stop string.
        keep = len(row.tokens)
        while keep and len(self._decode(row.tokens[:keep])) > cut:
            keep -= 1
        row.tokens = row.tokens[:keep]
        if row.logprobs is not None:
            row.logprobs = row.logprobs[:keep]

    def _stream(self, row: _Row) -> None:
        assert row.on_text is not None
        if row.finish is not None:
            text = self._final_text(row)
        else:
            text = self._decode(row.tokens)
            # Hold back a possible start of a stop string and half-decoded characters.
            text = text[: len(text) - held_back(text, row.params.stop)].rstrip("\ufffd")
        if len(text) > row.emitted:
            row.on_text(text[row.emitted :])
            row.emitted = len(text)

    # -----------------------------------------------------------------------------------------------------
    # Results

    def _final_text(self, row: _Row) -> str:
        if row.text is None:
            row.text = self._decode(row.tokens)
        return row.text

    def _completion(self, row: _Row) -> Completion:
        return Completion(
            text=self._final_text(row),
            finish_reason=row.finish or "length",
            prompt_tokens=len(row.prompt),
            completion_tokens=row.generated,
            logprobs=row.logprobs,
        )

    def _account(self, completions: list[Completion]) -> None:
        usage = self.usage
        usage.requests += len(completions)
        usage.sent += len(completions)
        usage.failures += sum(not c.ok for c in completions)
        usage.prompt_tokens += sum(c.prompt_tokens for c in completions)
        usage.completion_tokens += sum(c.completion_tokens for c in completions)

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _text_of(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            with self._tokenizer_lock:
                text = self.tokenizer.decode([token])
            self._token_text[token] = text
        return text

    def _merge_by_text(self, pairs: Any, logp_row: Any, candidate_ids: dict[str, int]) -> dict[str, float]:
        merged: dict[str, float] = {}
        seen: set[int] = set()
        for token, value in [*pairs, *((i, float(logp_row[i])) for i in candidate_ids.values())]:
            if token in seen:
                continue
            seen.add(token)
            text = self._text_of(token)
            merged[text] = _logaddexp(merged[text], value) if text in merged else value
        return dict(sorted(merged.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------------------------------------------------
# Pure helpers


def sample_token(logits: Any, temperature: float, top_p: float, rng: Any) -> int:
    """Draw a token id from softmax(logits / temperature) restricted to the top-p nucleus."""
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=rng))
    sorted_probs, order = probs.sort(descending=True)
    # A token is in the nucleus when the mass before it is below top_p (the most likely one always is).
    in_nucleus = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    choice = torch.multinomial(sorted_probs * in_nucleus, 1, generator=rng)
    return int(order[choice])


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in text, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of text that could still grow into a stop string (not streamed yet)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def _logaddexp(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi)) if lo != -math.inf else hi


def _stop_ids(eot_id: int, tokenizer: Any, model: Any) -> set[int]:
    """The template's end-of-turn token, the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {eot_id}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, list | tuple):
        ids.update(int(i) for i in config_eos)
    return ids


def _fresh_seed() -> int:
    import torch

    # Drawn from torch's global generator, so torch.manual_seed makes unseeded sampling reproducible too.
    return int(torch.randint(0, 2**62, (1,)))


def _bind_choice(on_text: Callable[[int, str], None] | None, choice: int) -> Callable[[str], None] | None:
    if on_text is None:
        return None
    return lambda delta: on_text(choice, delta)


def _shared_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own."""
    shared = min(len(r) for r in rows) - 1
    for n in range(shared):
        if any(r[n] != rows[0][n] for r in rows):
            return n
    return shared


def _branch_groups(rows: Sequence[Sequence[int]]) -> list[tuple[Sequence[int], list[Sequence[int]]]]:
    """Prompt rows as groups of the scoring primitive: the tokens they share as one prefix (each row keeping
    at least its last token), or, sharing none, each row alone; the continuations come out in row order."""
    shared = _shared_length(rows)
    if shared:
        return [(rows[0][:shared], [r[shared:] for r in rows])]
    return [(r[:-1], [r[-1:]]) for r in rows]


def _cache_kwarg(model: Any) -> str:
    import inspect

    # transformers renamed `past_key_values` to `cache` (5.2x); older 5.x only knows the first.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prunable(cache: Any) -> bool:
    from transformers import DynamicCache

    return isinstance(cache, DynamicCache)


def _worth_pruning(alive: int, in_batch: int) -> bool:
    # Dropping rows copies the whole cache: do it once a quarter of the batch has finished, not every step.
    return alive < in_batch and in_batch - alive >= max(1, in_batch // 4)
