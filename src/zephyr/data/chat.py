"""Chat templates rendered into token ids and an assistant-only loss mask.

A conversation is rendered once with the tokenizer's chat template into text and tokenized once. The trained
tokens are found from character spans: for each assistant message, the conversation before it rendered with
the generation prompt must be a textual prefix of the conversation up to and including it, which must be a
prefix of the whole render; the trained span is what follows that prefix, up to and including the template's
end-of-turn token. The text after the end-of-turn token (usually a newline) belongs to the template, not
to the answer: it is not trained, and the model never has to produce it because generation stops at the
end-of-turn token.

Rules a template must follow to be used for training (violations raise `TemplateError`, never a warning):
- prefix renders are textual prefixes of longer renders (templates that rewrite earlier turns fail);
- after the assistant content comes a special token of the tokenizer, optionally after whitespace: the
  end-of-turn token.
A message whose content holds the end-of-turn token's text is refused (`DataError`): the tokenizer would
read it as the special token and the turn would end inside the text.

BOS: a template whose text starts with the BOS token brings its own; otherwise the BOS is added exactly
when the tokenizer would add one to plain text (Mistral: one `<s>`; SmolLM2: none). EOS is never added
by the tokenizer: the template writes the end-of-turn token.

This module is pure given a tokenizer (no model, no files except the built-in templates).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import numpy.typing as npt

from zephyr.core.errors import DataError, ZephyrError

BUILTIN_TEMPLATES = ("zephyr", "chatml")
# Unique text that no template produces by itself: locates the assistant content in a probe render.
_PROBE = "zephyr-end-of-turn-probe"
_GREEN, _RESET = "\x1b[32m", "\x1b[0m"


class TemplateError(ZephyrError):
    """A chat template cannot render a conversation into consistent training ids."""


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: token ids and a loss mask (1 = trained token, the next-token target)."""

    input_ids: list[int]
    loss_mask: list[int]

    @property
    def num_trained(self) -> int:
        return sum(self.loss_mask)


def builtin_template(name: str) -> str:
    """The Jinja text of a template shipped with zephyr (`zephyr`, `chatml`)."""
    if name not in BUILTIN_TEMPLATES:
        raise TemplateError(
            f"unknown chat template {name!r}; built-in templates: {', '.join(BUILTIN_TEMPLATES)}"
        )
    return resources.files("zephyr").joinpath(f"templates/{name}.jinja").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Rendering and tokenizing


def render_text(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
) -> str:
    """The conversation as text, through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "the tokenizer has no chat template; load it with zephyr.models.load.load_tokenizer(spec, chat_template=...)"
        )
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja errors, raise_exception() in templates, bad message types
        raise TemplateError(f"the chat template failed on {_excerpt(messages)}: {exc}") from exc
    if not isinstance(text, str):
        raise TemplateError(f"the chat template returned {type(text).__name__}, not text")
    return text


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text, with exactly one BOS where the model expects one (see module doc)."""
    ids: list[int] = encode_texts(tokenizer, [text])[0].tolist()
    return ids


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Token ids of a prompt for generation: the conversation followed by the generation prompt."""
    return encode_text(tokenizer, render_text(tokenizer, messages, add_generation_prompt=True))


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos


Offsets = npt.NDArray[np.int64]  # [tokens, 2]: each token's character span [start, end) in its text


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[npt.NDArray[np.int32]]:
    """`encode_text` of several texts in one batch call, as int32 arrays."""
    return [ids for ids, _ in _encode_batch(tokenizer, texts, offsets=False)]


def _encode_batch(
    tokenizer: Any, texts: Sequence[str], offsets: bool = True
) -> list[tuple[npt.NDArray[np.int32], Offsets]]:
    """Token ids and character offsets (all zero without `offsets`) of several texts, in one call of the fast
    tokenizer's batch API (the same ids as one call per text), with the BOS rule of the module doc."""
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(
            f"{type(tokenizer).__name__} gives no character offsets; use a fast (tokenizers) one"
        )
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=offsets)
    spans = enc["offset_mapping"] if offsets else [()] * len(texts)
    bos_token = getattr(tokenizer, "bos_token", None)
    adds_bos = _adds_bos(tokenizer)
    out = []
    for text, ids, pairs in zip(texts, enc["input_ids"], spans, strict=True):
        id_array = np.array(ids, dtype=np.int32)
        if offsets:  # (from a flat iterator: a third of the time np.array takes over a list of pairs)
            flat = np.fromiter(itertools.chain.from_iterable(pairs), dtype=np.int64, count=2 * len(pairs))
            offset_array = flat.reshape(-1, 2)
        else:
            offset_array = np.zeros((len(ids), 2), dtype=np.int64)
        if adds_bos and not (bos_token and text.startswith(bos_token)):
            id_array = np.concatenate([np.array([tokenizer.bos_token_id], dtype=np.int32), id_array])
            offset_array = np.concatenate([np.zeros((1, 2), dtype=np.int64), offset_array])
        out.append((id_array, offset_array))
    return out


# ---------------------------------------------------------------------------------------------------------
# End of turn


def _special_tokens(tokenizer: Any) -> set[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added))
    return {t for t in tokens if t}


def end_of_turn(tokenizer: Any) -> tuple[str, int]:
    """The template's end-of-turn token and its id.

    Rule: render one user turn and one assistant turn, and take the longest special token of the tokenizer
    that the text right after the assistant content starts with (whitespace in between is allowed).
    Zephyr: `</s>` (the eos token); ChatML: `<|im_end|>`.
    """
    text = render_text(
        tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    )
    at = text.rfind(_PROBE)
    if at < 0:
        raise TemplateError("the chat template does not write the assistant's content verbatim")
    tail = text[at + len(_PROBE) :].lstrip()
    matches = [tok for tok in _special_tokens(tokenizer) if tail.startswith(tok)]
    if not matches:
        raise TemplateError(
            f"the chat template writes {tail[:40]!r} after the assistant's content: no special token of the "
            "tokenizer ends the turn, so generation could not stop there (does the tokenizer lack this "
            "template's end-of-turn token?)"
        )
    token = max(matches, key=len)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None:
        raise TemplateError(f"end-of-turn token {token!r} has no id in the tokenizer")
    return token, int(token_id)


# ---------------------------------------------------------------------------------------------------------
# Conversations (SFT) and prompt/answer pairs (DPO)


def _answer_end(turn: str, eot: str, messages: Sequence[Mapping[str, Any]]) -> int:
    """Where the trained part of an assistant turn's text ends: right after its end-of-turn token."""
    at = turn.rfind(eot)
    if at < 0:
        raise TemplateError(f"the assistant turn does not end with {eot!r} in {_excerpt(messages)}")
    return at + len(eot)


def _check_contents(messages: Sequence[Mapping[str, Any]], eot: str) -> None:
    """Content holding the end-of-turn token's text would tokenize to it and end the turn mid-text."""
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str) and eot in content:
            raise DataError(f"messages[{i}].content contains the end-of-turn token {eot!r}")


Spans = list[tuple[int, int]]  # character spans [start, end) of a rendered conversation


def assistant_spans(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], eot: str | None = None
) -> tuple[str, Spans]:
    """The full render and the character spans [start, end) of every assistant answer + end-of-turn.

    `eot`: the template's end-of-turn token when the caller already knows it (`end_of_turn`), as when it
    renders many conversations with one tokenizer."""
    if eot is None:
        eot, _ = end_of_turn(tokenizer)
    _check_contents(messages, eot)
    answers = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
    renders = [
        (
            i,
            render_text(tokenizer, messages[:i], add_generation_prompt=True),
            render_text(tokenizer, messages[: i + 1]),
        )
        for i in answers
    ]
    # a conversation that ends with an answer is its last render up to an answer (one render fewer)
    full = (
        renders[-1][2] if answers and answers[-1] == len(messages) - 1 else render_text(tokenizer, messages)
    )
    spans = []
    for i, prompt, upto in renders:
        if not upto.startswith(prompt) or not full.startswith(upto):
            raise TemplateError(
                f"the chat template is not prefix-consistent at message {i}: the conversation before it "
                f"(with the generation prompt) or up to it is not a prefix of the whole render, "
                f"in {_excerpt(messages)}"
            )
        start = len(prompt)
        spans.append((start, start + _answer_end(upto[start:], eot, messages)))
    return full, spans


def conversation_text(tokenizer: Any, messages: Sequence[Mapping[str, Any]], eot: str | None = None) -> str:
    """The whole conversation's text, for training on every token: its messages checked for the end-of-turn
    token's text as `assistant_spans` checks them, no spans (the text is `assistant_spans`' first value)."""
    _check_contents(messages, eot if eot is not None else end_of_turn(tokenizer)[0])
    return render_text(tokenizer, messages)


def render_conversation(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> Rendered:
    """Token ids of the whole conversation and a mask of the assistant answers and their end-of-turn tokens.

    A token is trained when its characters overlap an assistant span (a zero-width token when it sits
    inside one). A token straddling a turn header and the answer is therefore trained; templates that
    produce such tokens also fail `render_prompt_answer`'s strict prefix check.
    """
    ((ids, mask),) = encode_conversations(tokenizer, [assistant_spans(tokenizer, messages)])
    return Rendered(input_ids=ids.tolist(), loss_mask=mask.tolist())


def encode_conversations(
    tokenizer: Any, rendered: Sequence[tuple[str, Spans]]
) -> list[tuple[npt.NDArray[np.int32], npt.NDArray[np.uint8]]]:
    """`render_conversation` for many conversations at once: the texts and assistant spans of
    `assistant_spans` into token ids (int32) and loss masks (uint8), tokenized in one batch call."""
    encoded = _encode_batch(tokenizer, [text for text, _ in rendered])
    return [
        (ids, span_mask(offsets, spans)) for (ids, offsets), (_, spans) in zip(encoded, rendered, strict=True)
    ]


def span_mask(offsets: Offsets, spans: Spans) -> npt.NDArray[np.uint8]:
    """1 for each token whose characters overlap a span (a zero-width token: that sits inside one), else 0.

    Vectorised over the tokens: the spans are merged into disjoint sorted intervals (the same set of
    characters, so the same answer), then each token needs only the first interval that ends after its
    start: it overlaps one iff that interval starts before the token's end (zero width: at or before its
    start)."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if not merged or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=np.uint8)
    starts, ends = offsets[:, 0], offsets[:, 1]
    lo = np.array([s for s, _ in merged], dtype=np.int64)
    hi = np.array([e for _, e in merged], dtype=np.int64)
    k = np.searchsorted(hi, starts, side="right")  # first interval ending after the token's start
    found = k < len(hi)
    first_start = lo[np.minimum(k, len(lo) - 1)]
    overlaps = np.where(ends > starts, first_start < ends, first_start <= starts)
    return (found & overlaps).astype(np.uint8)


def render_prompt_answer(
    tokenizer: Any, prompt_messages: Sequence[Mapping[str, Any]], answer_content: str
) -> tuple[list[int], list[int]]:
    """(prompt_ids, answer_ids): the prompt with the generation prompt, and the answer + end-of-turn token.

    The prompt's ids must be an exact prefix of the ids of prompt + answer (otherwise the log-probs of the
    answer would be scored on a context the model never sees at generation): TemplateError if not.
    `answer_ids` end with the end-of-turn token and exclude the template text after it, the same tokens
    `render_conversation` trains. Multi-turn prompts (earlier assistant turns included) work. Many pairs at
    once: `prompt_answer_texts`, one `encode_texts` call, then `answer_after_prompt` (the same ids).
    """
    eot, eot_id = end_of_turn(tokenizer)
    prompt, (full,) = prompt_answer_texts(tokenizer, prompt_messages, [answer_content], eot)
    prompt_ids, all_ids = encode_texts(tokenizer, [prompt, full])
    conversation = [*prompt_messages, {"role": "assistant", "content": answer_content}]
    answer = answer_after_prompt(tokenizer, prompt_ids, all_ids, eot, eot_id, conversation)
    return prompt_ids.tolist(), answer.tolist()


def prompt_answer_texts(
    tokenizer: Any, prompt_messages: Sequence[Mapping[str, Any]], answers: Sequence[str], eot: str
) -> tuple[str, list[str]]:
    """The prompt's text with the generation prompt, and for each answer the text of prompt + answer up to
    and including the answer's end-of-turn token (what `render_prompt_answer` tokenizes). TemplateError when
    the prompt is not a textual prefix of prompt + answer."""
    prompt = render_text(tokenizer, prompt_messages, add_generation_prompt=True)
    texts = []
    for answer in answers:
        conversation = [*prompt_messages, {"role": "assistant", "content": answer}]
        _check_contents(conversation, eot)
        full = render_text(tokenizer, conversation)
        if not full.startswith(prompt):
            raise TemplateError(
                f"the prompt rendered with the generation prompt is not a textual prefix of prompt + answer in "
                f"{_excerpt(conversation)}"
            )
        texts.append(full[: len(prompt) + _answer_end(full[len(prompt) :], eot, conversation)])
    return prompt, texts


def answer_after_prompt(
    tokenizer: Any,
    prompt_ids: npt.NDArray[np.int32],
    all_ids: npt.NDArray[np.int32],
    eot: str,
    eot_id: int,
    conversation: Sequence[Mapping[str, Any]],
) -> npt.NDArray[np.int32]:
    """The ids of prompt + answer after the prompt's: TemplateError unless the prompt's ids are their exact
    prefix and the answer ends with the end-of-turn token (`conversation` names the pair in the error)."""
    n = len(prompt_ids)
    if len(all_ids) < n or not np.array_equal(all_ids[:n], prompt_ids):
        at = next(
            (k for k, (a, b) in enumerate(zip(prompt_ids, all_ids, strict=False)) if a != b), len(all_ids)
        )
        raise TemplateError(
            f"the prompt's token ids are not a prefix of the prompt + answer ids (first difference at token "
            f"{at}: prompt has {tokenizer.convert_ids_to_tokens(prompt_ids[at : at + 3].tolist())}, prompt + "
            f"answer has {tokenizer.convert_ids_to_tokens(all_ids[at : at + 3].tolist())}) in "
            f"{_excerpt(conversation)}"
        )
    answer = all_ids[n:]
    if len(answer) == 0 or answer[-1] != eot_id:
        raise TemplateError(f"the answer does not tokenize to ... {eot!r} in {_excerpt(conversation)}")
    return answer


# ---------------------------------------------------------------------------------------------------------
# Display (`zephyr data show`)


def show_record(tokenizer: Any, record: Mapping[str, Any], color: bool) -> str:
    """A conversations or pairs record rendered with its trained tokens marked, and token counts.

    Trained spans are green when `color`, otherwise wrapped in `[[` `]]`. A pairs record shows chosen
    and rejected, each as the prompt plus the answer that DPO scores.
    """
    lines = []
    if "prompt_id" in record:
        lines.append(f"# prompt_id: {record['prompt_id']}")
    if "messages" in record:
        rendered = render_conversation(tokenizer, record["messages"])
        lines.append(_marked(tokenizer, rendered, color))
    elif "chosen" in record and "rejected" in record:
        for side in ("chosen", "rejected"):
            messages = record[side]
            if not messages or messages[-1].get("role") != "assistant":
                raise DataError(f"{side}: the last message must be the assistant's answer")
            prompt_ids, answer_ids = render_prompt_answer(tokenizer, messages[:-1], messages[-1]["content"])
            rendered = Rendered(prompt_ids + answer_ids, [0] * len(prompt_ids) + [1] * len(answer_ids))
            lines.append(f"## {side}")
            lines.append(_marked(tokenizer, rendered, color))
    else:
        raise DataError(f"record has neither 'messages' nor 'chosen'/'rejected': keys {sorted(record)}")
    return "\n".join(lines)


def _marked(tokenizer: Any, rendered: Rendered, color: bool) -> str:
    """Decoded text with trained runs marked; runs are cut from prefix decodes so spacing stays exact."""
    ids, mask = rendered.input_ids, rendered.loss_mask
    pieces, done, start = [], "", 0
    for k in range(1, len(ids) + 1):
        if k < len(ids) and mask[k] == mask[start]:
            continue
        text = tokenizer.decode(ids[:k], skip_special_tokens=False)
        run = text[len(done) :]
        if mask[start]:
            run = f"{_GREEN}{run}{_RESET}" if color else f"[[{run}]]"
        pieces.append(run)
        done, start = text, k
    return "".join(pieces) + f"\n({len(ids)} tokens, {rendered.num_trained} trained)"


def _excerpt(messages: Sequence[Mapping[str, Any]], width: int = 60) -> str:
    parts = []
    for m in messages:
        content = str(m.get("content", "")) if isinstance(m, Mapping) else repr(m)
        short = content if len(content) <= width else content[: width - 3] + "..."
        role = m.get("role", "?") if isinstance(m, Mapping) else "?"
        parts.append(f"{role}: {short!r}")
    return "[" + "; ".join(parts) + "]"
