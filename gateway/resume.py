"""Resuming a stream when its job re-runs on another worker, without a gap or a duplicate.

Every job is sampled with a seed (the gateway draws one when the caller gives none), so
a re-run reproduces the text already sent. The re-run's text is checked against it and
only what goes beyond it is forwarded; if it differs, the call ends with ABORTED.
"""

from gateway.errors import Aborted


class StreamedText:
    """The text a streaming caller has received, and the replay of a re-run against it."""

    def __init__(self) -> None:
        self.sent = ""
        self.tokens_sent = 0
        self._replay: str | None = None  # text of the current re-run while it catches up

    def restart(self) -> None:
        """A new attempt began; its text starts from the beginning again."""
        self._replay = "" if self.sent else None

    def forward(self, text: str, completion_tokens: int) -> str:
        """Returns the part of a delta the caller has not seen yet."""
        if self._replay is None:
            self.sent += text
            self.tokens_sent = completion_tokens
            return text
        self._replay += text
        common = min(len(self._replay), len(self.sent))
        if self._replay[:common] != self.sent[:common]:
            raise self._diverged()
        if len(self._replay) <= len(self.sent):
            return ""
        new = self._replay[len(self.sent) :]
        self._replay = None
        self.sent += new
        self.tokens_sent = completion_tokens
        return new

    def check_finished(self) -> None:
        """At the end of a re-run: it must have reproduced everything that was sent."""
        if self._replay is not None and len(self._replay) < len(self.sent):
            raise self._diverged()

    def _diverged(self) -> Aborted:
        return Aborted(
            f"the worker running this job was lost after {self.tokens_sent} tokens were sent, and the re-run"
            " did not reproduce them; retry the request"
        )
