"""`zephyr chat`: the loop fed scripted lines; the tiny random model streams, keeps history and resets."""

from __future__ import annotations

import pytest

from zephyr.chat import load_generator, run_chat
from zephyr.core.errors import ConfigError
from zephyr.data import chat
from zephyr.generation import Completion

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Lines:
    """input() replacement: returns the scripted lines, then raises `end` (EOFError by default)."""

    def __init__(self, *lines, end=EOFError):
        self.lines, self.end, self.prompts = list(lines), end, []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        if not self.lines:
            raise self.end
        return self.lines.pop(0)


class Writes:
    """A text stream that keeps every write apart (to see the answer arrive in pieces)."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.writes)


def test_tiny_model_streams_keeps_history_and_resets(tiny_model_dir, monkeypatch):
    rendered = []
    render_text = chat.render_text

    def spy(tokenizer, messages, add_generation_prompt=False):
        if add_generation_prompt:  # the prompts of answers (not the end-of-turn probe at load time)
            rendered.append([dict(m) for m in messages])
        return render_text(tokenizer, messages, add_generation_prompt)

    monkeypatch.setattr(chat, "render_text", spy)
    out = Writes()
    lines = Lines("Hello there", "  ", "And again?", "/reset", "Fresh start", "/exit", "never read")
    session = run_chat(str(tiny_model_dir), max_new_tokens=6, temperature=0.0, input_fn=lines, output=out)

    assert len(rendered) == 3 and lines.lines == ["never read"]  # the blank line was skipped, /exit ended
    assert rendered[0] == [{"role": "user", "content": "Hello there"}]
    answer_1 = rendered[1][1]["content"]
    assert rendered[1] == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": answer_1},
        {"role": "user", "content": "And again?"},
    ]
    assert rendered[2] == [{"role": "user", "content": "Fresh start"}]  # /reset forgot both turns
    assert session.history[0] == {"role": "user", "content": "Fresh start"} and len(session.history) == 2
    # the first answer was written as it was decoded: the writes after the banner, up to the line end
    end = next(i for i, w in enumerate(out.writes) if i > 0 and w.startswith("\n"))
    pieces = out.writes[1:end]
    assert len(pieces) > 1 and "".join(pieces) == answer_1 != ""
    assert "(conversation cleared)\n" in out.writes


class ScriptedModel:
    """A generator without `generate_requests` (like the HTTP backend): answers by script, records calls."""

    model_id = "scripted"

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []

    def generate(self, conversations, params):
        self.calls.append(([list(c) for c in conversations], params))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return [answer]


def test_a_command_word_lists_the_commands_but_a_path_is_a_message():
    model = ScriptedModel(Completion("a folder", "stop"))
    out = Writes()
    run_chat("scripted", input_fn=Lines("/help", "/usr/bin", end=EOFError), output=out, generator=model)
    assert [c[0][0] for c in model.calls] == [[{"role": "user", "content": "/usr/bin"}]]
    assert out.text.count("commands: /reset") == 1


def test_system_prompt_failures_and_interrupts_stay_out_of_the_history():
    model = ScriptedModel(
        Completion("Hi!", "stop"),
        Completion.failed("the prompt has 9 tokens; the model's context is 8 tokens"),
        KeyboardInterrupt(),
        Completion("Long answer", "length"),
    )
    out = Writes()
    lines = Lines("hello", "tell me more", "and more", "last", "/help", end=KeyboardInterrupt)
    session = run_chat(
        "scripted", system="Be brief.", max_new_tokens=5, temperature=0.3,
        input_fn=lines, output=out, generator=model,
    )  # fmt: skip
    system = {"role": "system", "content": "Be brief."}
    turn_1 = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi!"}]
    assert [c[0][0] for c in model.calls] == [
        [system, turn_1[0]],
        [system, *turn_1, {"role": "user", "content": "tell me more"}],
        [system, *turn_1, {"role": "user", "content": "and more"}],  # the failed turn was not kept
        [system, *turn_1, {"role": "user", "content": "last"}],  # nor the interrupted one
    ]
    assert {(p.max_tokens, p.temperature) for _, p in model.calls} == {(5, 0.3)}
    assert session.history == [
        *turn_1,
        {"role": "user", "content": "last"},
        {"role": "assistant", "content": "Long answer"},
    ]
    assert "Hi!" in out.writes and "Long answer" in out.writes  # non-streaming backend: the whole text once
    assert "(no answer: the prompt has 9 tokens; the model's context is 8 tokens;" in out.text
    assert "(answer stopped; not kept in the conversation)" in out.text
    assert "(cut at 5 tokens)" in out.text
    assert "commands: /reset" in out.text  # /help is not sent to the model
    assert lines.prompts == ["> "] * 6  # Ctrl-C at the sixth prompt ended the chat


def test_openai_spec_keeps_the_endpoint_template():
    with pytest.raises(ConfigError, match="endpoint's own template"):
        load_generator("openai:some-model@http://127.0.0.1:9/v1", chat_template="zephyr")
    generator = load_generator("openai:some-model@http://127.0.0.1:9/v1")
    assert not hasattr(generator, "generate_requests")
