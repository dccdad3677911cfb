"""Turning generated token ids into text deltas, with stop sequences cut out.

Used by engines that do not handle stop sequences themselves (the CPU engine).
"""

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Text of the tokens so far, released only when it can no longer change.

    A token can end in the middle of a multi-byte character (decoded as U+FFFD);
    such text is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Decoder) -> None:
        self._tokenizer = tokenizer
        self._token_ids: list[int] = []
        self._released = 0  # characters of the full text already returned

    def add(self, token_ids: Sequence[int], final: bool = False) -> str:
        self._token_ids.extend(token_ids)
        text = self._tokenizer.decode(self._token_ids, skip_special_tokens=True)
        end = len(text)
        if not final:
            while end > self._released and text[end - 1] == "\ufffd":
                end -= 1
        new = text[self._released : end]
        self._released = end
        return new


class StopMatcher:
    """Finds the first stop sequence in a stream of text pieces.

    Text that could be the start of a stop sequence is held back until the next piece
    decides it, so a stop sequence split across tokens or chunks is never returned.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""
        self.matched = False

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit; sets `matched` once a stop sequence is seen."""
        if self.matched:
            return ""
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.matched = True
            out, self._pending = self._pending[:cut], ""
            return out
        safe = len(self._pending) - self._hold
        if safe <= 0:
            return ""
        out, self._pending = self._pending[:safe], self._pending[safe:]
        return out

    def flush(self) -> str:
        """At the end of generation: everything held back is safe."""
        out, self._pending = ("" if self.matched else self._pending), ""
        return out
