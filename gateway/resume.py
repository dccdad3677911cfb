"""Resuming a call when its job is taken over by another worker, without a gap or a duplicate.

The worker that takes a job over continues the generation from the job's progress record
(worker/runner.py): the tokens already generated become part of its prompt, and it sends
only what comes after the text already sent. Its Started says so (`continued`,
`continued_from_tokens`) and its events carry on the earlier attempt's seq
(gateway/subscription.py), so its deltas are forwarded as they come.

An attempt that starts over instead (no progress was recorded, or a JSON mode job, whose
grammar cannot be resumed mid-output) is harmless while the caller has seen no text: a
unary call drops what it had gathered. After text was streamed it is not: the call ends
ABORTED, the one case where progress cannot be recovered.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from common import codec
from gateway.errors import Aborted

Logprobs = tuple[codec.TokenLogprob, ...]
ToolCalls = tuple[codec.ToolCall, ...]


@dataclass
class ChoiceReply:
    """One choice of a unary reply, joined at the end."""

    pieces: list[str] = field(default_factory=list)
    logprobs: list[codec.TokenLogprob] = field(default_factory=list)  # one per token, if asked for
    tool_calls: list[codec.ToolCall] = field(default_factory=list)

    def add(
        self, text: str, logprobs: Sequence[codec.TokenLogprob], tool_calls: Sequence[codec.ToolCall] = ()
    ) -> None:
        self.pieces.append(text)
        self.logprobs.extend(logprobs)
        self.tool_calls.extend(tool_calls)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class ReplyProgress:
    """The reply received so far across a job's attempts: each choice's text, logprobs and tokens."""

    def __init__(self, stream: bool) -> None:
        self._stream = stream
        self.choices: dict[int, ChoiceReply] = {}  # unary: by index, the text to join at the end
        self.forwarded = False  # stream: text or logprobs went to the caller
        self._tokens: dict[int, int] = {}  # by choice: tokens behind the text received

    @property
    def completion_tokens(self) -> int:
        """Tokens behind the text received, all choices together."""
        return sum(self._tokens.values())

    def add(self, delta: codec.Delta) -> tuple[str, Logprobs, ToolCalls]:
        """Records a delta; returns the text, logprobs and tool calls to forward now (a stream's only)."""
        self._tokens[delta.index] = delta.completion_tokens
        if not self._stream:
            self.choices.setdefault(delta.index, ChoiceReply()).add(
                delta.text, delta.logprobs, delta.tool_calls
            )
            return "", (), ()
        self.forwarded = self.forwarded or bool(delta.text or delta.logprobs or delta.tool_calls)
        return delta.text, tuple(delta.logprobs), tuple(delta.tool_calls)

    def take_over(self, started: codec.Started) -> str:
        """A newer attempt began: "continued" or "restarted"; raises Aborted if it cannot go on."""
        if started.continued:
            if started.continued_from_tokens != self.completion_tokens:
                raise Aborted(
                    f"the worker running this job was lost; its progress record has"
                    f" {started.continued_from_tokens} tokens where {self.completion_tokens} were"
                    " received, so the reply cannot be continued; retry the request"
                )
            return "continued"
        if self.forwarded:
            raise Aborted(
                f"the worker running this job was lost after {self.completion_tokens} tokens were sent,"
                " and the job had to start over (its progress could not be recovered); retry the request"
            )
        self.choices.clear()
        self._tokens.clear()
        return "restarted"
