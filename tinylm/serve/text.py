"""Tokens to the text a client is sent: whole characters only, cut before the first stop sequence.

Like `tinylm generate`'s Stream, the bytes of a character that spans tokens wait for its last
byte (an incremental UTF-8 decoder, so the text equals `tokenizer.decode` of the tokens). And
while the end of the text could still grow into a stop sequence, that end is held back: a
client never receives text that a later token reveals to be the start of a stop sequence.
"""
from __future__ import annotations

import codecs
from typing import Sequence

from tinylm.tokenizer.bpe import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of it released
        self.stopped = False  # a stop sequence was found: nothing more is released

    def push(self, token: int) -> str:
        """The text this token releases (often "", while a character or a possible stop is pending)."""
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        return self._release(final=False)

    def finish(self) -> str:
        """The rest, once no token will follow."""
        self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        # Text up to `sent` never held the start of a stop sequence, so one can only start after it.
        found = [index for stop in self.stops if (index := self.text.find(stop, self.sent)) >= 0]
        if found:
            self.stopped, end = True, min(found)
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._possible_stop_start()
        released, self.sent = self.text[self.sent:end], end
        return released

    def _possible_stop_start(self) -> int:
        """Length of the longest unreleased end of the text that a stop sequence begins with."""
        pending = self.text[self.sent:]
        for length in range(min(len(pending), max(map(len, self.stops), default=1) - 1), 0, -1):
            if any(stop.startswith(pending[-length:]) for stop in self.stops):
                return length
        return 0
