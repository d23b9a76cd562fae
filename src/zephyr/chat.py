"""`zephyr chat MODEL`: talk to a model in the terminal through its own chat template, tokens streamed.

The whole conversation (system prompt, every earlier turn, the new message) is rendered by the model's chat
template at every turn, the same rendering as generation and `zephyr serve` (`zephyr.generation`), and the
answer stops at the template's end-of-turn token. Local models (a path, `transformers:`, `asset:`) print
their tokens as they are decoded; `vllm:` and `openai:MODEL@URL` print the whole answer at once.

Commands: `/reset` forgets the conversation (the system prompt stays), `/exit` ends; so do end of input
(Ctrl-D) and Ctrl-C at the prompt. Ctrl-C while the model answers stops that answer, and the turn is left
out of the history. A turn that cannot be answered (a conversation longer than the model's context, a failed
request) is reported and left out of the history too.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from zephyr.core.errors import ConfigError
from zephyr.generation import Completion, Generator, Request, SamplingParams, make_generator, parse_spec

PROMPT = "> "
COMMANDS = {"/reset": "forget the conversation (the system prompt stays)", "/exit": "end the chat"}


@dataclass
class ChatSession:
    """A conversation with a generator: the system prompt, the turns so far, and the sampling parameters."""

    generator: Generator
    params: SamplingParams
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user: str) -> list[dict[str, str]]:
        """What the chat template renders for the next answer."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": user}]

    def reply(self, user: str, on_text: Callable[[str], None]) -> Completion:
        """The model's answer to `user`, its text passed to `on_text` as it comes; a successful turn joins
        the history."""
        completion = complete(self.generator, self.messages(user), self.params, on_text)
        if completion.ok:
            self.history += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": completion.text},
            ]
        return completion

    def reset(self) -> None:
        self.history.clear()


def complete(
    generator: Generator,
    messages: list[dict[str, str]],
    params: SamplingParams,
    on_text: Callable[[str], None],
) -> Completion:
    """One completion; streamed through `on_text` where the backend runs requests (local models), else the
    whole text once."""
    if hasattr(generator, "generate_requests"):
        [[completion]] = generator.generate_requests([Request(messages, params, lambda _, d: on_text(d))])
        return completion
    [completion] = generator.generate([messages], params)
    if completion.ok and completion.text:
        on_text(completion.text)
    return completion


def load_generator(model: str, chat_template: str = "auto") -> Generator:
    """The generator of a model spec; `chat_template` applies to the backends that render it themselves."""
    options: dict[str, Any] = {}
    if parse_spec(model).backend == "openai":
        if chat_template != "auto":
            raise ConfigError(
                f"--chat-template {chat_template}: {model} renders with the endpoint's own template"
            )
    else:
        options["chat_template"] = chat_template
    return make_generator(model, **options)


def run_chat(
    model: str,
    *,
    chat_template: str = "auto",
    system: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    input_fn: Callable[[str], str] = input,
    output: TextIO | None = None,
    generator: Generator | None = None,
) -> ChatSession:
    """Chat until `/exit`, end of input or Ctrl-C at the prompt (module docstring); returns the session.

    `input_fn(prompt)` reads a line (raising EOFError at the end) and `output` receives everything printed
    (default: standard output); `generator`, when given, is used instead of loading `model`.
    """
    out = output if output is not None else sys.stdout
    if input_fn is input:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature)
    session = ChatSession(generator or load_generator(model, chat_template), params, system)
    _say(out, f"Chatting with {model}. " + ", ".join(COMMANDS) + "; Ctrl-C stops an answer.\n")
    while True:
        try:
            line = input_fn(PROMPT)
        except (EOFError, KeyboardInterrupt):
            _say(out, "\n")
            return session
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return session
        if text == "/reset":
            session.reset()
            _say(out, "(conversation cleared)\n")
            continue
        if re.fullmatch(r"/[A-Za-z]+", text):  # a command word; `/usr/bin` is a message
            _say(out, "commands: " + "; ".join(f"{c}: {h}" for c, h in COMMANDS.items()) + "\n")
            continue
        _answer(session, text, out)


def _answer(session: ChatSession, user: str, out: TextIO) -> None:
    try:
        completion = session.reply(user, lambda delta: _say(out, delta))
    except KeyboardInterrupt:
        _say(out, "\n(answer stopped; not kept in the conversation)\n")
        return
    if not completion.ok:
        _say(out, f"(no answer: {completion.error}; /reset starts a new conversation)\n")
    elif completion.finish_reason == "length":
        _say(out, f"\n(cut at {session.params.max_tokens} tokens)\n")
    else:
        _say(out, "\n")


def _say(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()
