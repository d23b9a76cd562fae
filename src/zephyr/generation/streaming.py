"""Streaming one completion's text to a callback as it grows."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from zephyr.generation.decoding import streamable


class TextStream:
    """Sends `on_text` each new piece of an answer. While the answer grows, an end that could still become a
    stop string (or a half-decoded character) is held back; the final text is sent whole. The pieces add up
    to the final text, and a stop string is never shown."""

    def __init__(self, on_text: Callable[[str], None], stops: Sequence[str]):
        self.on_text = on_text
        self.stops = stops
        self.sent = 0  # characters already sent

    def update(self, text: str, *, final: bool) -> None:
        shown = text if final else streamable(text, self.stops)
        if len(shown) > self.sent:
            self.on_text(shown[self.sent :])
            self.sent = len(shown)
