"""The model calls of the transformers backend, behind one thin adaptor.

`ModelAdaptor` owns a causal LM and its tokenizer: it renders prompts with the chat template, decodes token
ids, runs the prefill of a left-padded batch, one decoding step with the KV cache, drops finished rows
from the cache, and releases the model (`close`). It decides nothing about which token comes next: that is
`zephyr.generation.decoding`, and the loop that joins the two is `zephyr.generation.loop`.
"""

from __future__ import annotations

import gc
import inspect
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from zephyr.core.errors import ZephyrError
from zephyr.data import chat
from zephyr.generation.base import Conversation


@dataclass
class KVState:
    """A batch between two decoding steps, one row per sequence in tensor order."""

    logits: torch.Tensor  # [rows, vocabulary] fp32: the distribution of each row's next token
    cache: Any  # the model's KV cache
    mask: torch.Tensor  # [rows, tokens] long: 0 on the left padding
    positions: torch.Tensor  # [rows] long: position of each row's last token (padding not counted)


class ModelAdaptor:
    """A transformers causal LM and its tokenizer (with the chat template to use), as decoding needs them."""

    def __init__(self, model: Any, tokenizer: Any):
        self._model: Any = model.eval()
        self._tokenizer: Any = tokenizer
        _, eot_id = chat.end_of_turn(tokenizer)
        self.stop_token_ids = frozenset(_stop_ids(eot_id, tokenizer, model))
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else eot_id
        self.max_context: int | None = getattr(model.config, "max_position_embeddings", None)
        # One user of the model at a time (the server's worker and a judge may share a generator).
        self.lock = threading.Lock()
        # Fast tokenizers are not safe to share between threads (the server renders prompts in its handler
        # threads while the worker decodes).
        self._tokenizer_lock = threading.RLock()
        self._token_text: dict[int, str] = {}
        self._cache_kwarg = _cache_kwarg(model)

    @property
    def model(self) -> Any:
        if self._model is None:
            raise ZephyrError("this generator was closed: its model is released")
        return self._model

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise ZephyrError("this generator was closed: its tokenizer is released")
        return self._tokenizer

    @property
    def closed(self) -> bool:
        return self._model is None

    def close(self) -> None:
        """Drop the model and the tokenizer, and give their memory back (the CUDA cache too, on a GPU), so
        that another model can be loaded in their place. Waits for a running batch; closing twice is fine."""
        with self.lock:
            if self._model is None:
                return
            on_cuda = self._model.device.type == "cuda"
            self._model = self._tokenizer = None
            self._token_text.clear()
        gc.collect()  # a model kept alive only by reference cycles would keep its memory until the next sweep
        if on_cuda:
            torch.cuda.empty_cache()

    # -----------------------------------------------------------------------------------------------------
    # The tokenizer

    def prompt_ids(self, messages: Conversation, answer_prefix: str = "") -> list[int]:
        """The conversation rendered with the generation prompt, then `answer_prefix`, as token ids."""
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            raise ZephyrError("a conversation must be a non-empty list of {role, content} messages")
        with self._tokenizer_lock:
            text = chat.render_text(self.tokenizer, messages, add_generation_prompt=True)
            return chat.encode_text(self.tokenizer, text + answer_prefix)

    def single_token_id(self, text: str) -> int:
        with self._tokenizer_lock:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ZephyrError(
                f"candidate {text!r} is {len(ids)} tokens for this tokenizer; it must be one token"
            )
        return int(ids[0])

    def decode(self, ids: Sequence[int]) -> str:
        """An answer's text: special tokens left out."""
        with self._tokenizer_lock:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_text(self, token: int) -> str:
        """One token's own text (special tokens included), as log-prob entries show it."""
        text = self._token_text.get(token)
        if text is None:
            with self._tokenizer_lock:
                text = str(self.tokenizer.decode([token]))
            self._token_text[token] = text
        return text

    # -----------------------------------------------------------------------------------------------------
    # The model

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> KVState:
        """Run left-padded prompts through the model: the state after each prompt's last token."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        mask = mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids.to(self.device), mask, positions, cache=None)
        return KVState(logits, cache, mask, mask.sum(-1) - 1)

    def step(self, state: KVState, tokens: Sequence[int]) -> KVState:
        """Feed one token per row (in the state's row order): the state one position further."""
        next_ids = torch.tensor(list(tokens), device=self.device)[:, None]
        positions = state.positions + 1
        mask = torch.cat([state.mask, state.mask.new_ones((len(tokens), 1))], dim=-1)
        logits, cache = self._forward(next_ids, mask, positions[:, None], state.cache)
        return KVState(logits, cache, mask, positions)

    def keep_rows(self, state: KVState, rows: Sequence[int]) -> KVState | None:
        """The state with only `rows` (indices, in order), or None where the cache cannot drop rows."""
        if not isinstance(state.cache, DynamicCache):
            return None
        index = torch.tensor(list(rows), device=self.device)
        state.cache.batch_select_indices(index)  # in place: the cache is the batch's largest tensor
        return KVState(state.logits[index], state.cache, state.mask[index], state.positions[index])

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True}
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        out = self.model(**kwargs, logits_to_keep=1)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.logits[:, -1, :].float(), new_cache


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


def _cache_kwarg(model: Any) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); older 5.x only knows the first.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
