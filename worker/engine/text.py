"""Stop sequences cut out of a stream of text, for engines that do not do it themselves.

vLLM cuts stop sequences itself; the benchmark engine uses this.
"""

from collections.abc import Sequence


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
