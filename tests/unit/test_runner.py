"""One job, exactly one terminal event, whatever the engine does (worker/runner.py).

The engine here is a scripted fake: it replays given deltas or raises a given error; the
continuation tests also use the benchmark engine, whose token i is `t{i} ` with id i.
"""

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest

from common import codec
from common.models import ModelSpec
from worker.engine.base import (
    Delta,
    Engine,
    EngineDead,
    EngineError,
    EngineRejected,
    EngineUnavailable,
    GenerationRequest,
    TokenLogprob,
    ToolCall,
    ToolUse,
)
from worker.engine.bench import BenchEngine
from worker.publisher import Progress
from worker.runner import JobEvents, can_continue, continued_params, run_job, sampling_params

Kind = codec.FailureKind


class ScriptedFakeEngine(Engine):
    def __init__(
        self,
        deltas: list[Delta],
        error: Exception | None = None,
        context_window: int = 100,
        text_of_tokens: dict[int, str] | None = None,
    ) -> None:
        self.model_name = "m"
        self.context_window = context_window
        self.fingerprint = "fp_fake"
        self._deltas = deltas
        self._error = error
        self._text_of_tokens = text_of_tokens or {}
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def decode(self, token_ids: list[int]) -> str:
        return "".join(self._text_of_tokens[t] for t in token_ids)

    @property
    def num_active(self) -> int:
        return 0

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        return self._replay()

    async def _replay(self) -> AsyncIterator[Delta]:
        for delta in self._deltas:
            yield delta
        if self._error is not None:
            raise self._error


class CollectingFakePublisher:
    def __init__(self) -> None:
        self.events: list[codec.Event] = []
        self.progress: list[Progress] = []

    def publish(self, reply_to: str, event: codec.Event, progress: Progress) -> None:
        self.events.append(codec.decode_event(codec.encode(event)))
        self.progress.append(progress)


def job(prompt_tokens: int = 5, **sampling: object) -> codec.Job:
    job = codec.Job(request_id="r1", model="m", prompt_token_ids=list(range(prompt_tokens)), reply_to="g")
    job.sampling.max_tokens = 10
    for name, value in sampling.items():
        if name == "stop":
            job.sampling.stop.extend(value)  # type: ignore[call-overload]
        elif name == "tools":
            job.sampling.tools.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(job.sampling, name, value)
    job.enqueued_at = time.time()
    return job


async def run(
    engine: Engine, the_job: codec.Job, progress: codec.Progress | None = None
) -> list[codec.Event]:
    """Runs the job as attempt 1, or as attempt 2 continuing from `progress`."""
    publisher = CollectingFakePublisher()
    attempt = 1 if progress is None else 2
    events = JobEvents(the_job.request_id, the_job.reply_to, attempt, publisher)  # type: ignore[arg-type]
    if progress is not None:
        events.continue_from(progress)
    await run_job(the_job, engine, events, "w1")
    kinds = [e.WhichOneof("kind") for e in publisher.events]
    assert kinds[0] == "started" and kinds.count("finished") + kinds.count("failed") == 1
    assert kinds[-1] in ("finished", "failed")
    first_seq = 0 if progress is None else progress.last_seq + 1
    assert [e.seq for e in publisher.events] == list(range(first_seq, first_seq + len(publisher.events)))
    # The progress each event writes: its seq, the text published so far, the tokens behind it.
    assert [p.seq for p in publisher.progress] == [e.seq for e in publisher.events]
    assert [p.fresh for p in publisher.progress] == [progress is None] + [False] * (len(kinds) - 1)
    released = 0 if progress is None else progress.released_chars
    assert publisher.progress[-1].released_chars == released + len(texts(publisher.events))
    return publisher.events


def texts(events: list[codec.Event]) -> str:
    return "".join(e.delta.text for e in events if e.HasField("delta"))


async def test_a_finished_generation_ends_with_finished_and_its_usage() -> None:
    engine = ScriptedFakeEngine([Delta("Hel", 1), Delta("lo", 2, "stop")])
    events = await run(engine, job())
    assert [e.delta.text for e in events if e.HasField("delta")] == ["Hel", "lo"]
    finished = events[-1].finished
    assert (finished.finish_reason, finished.prompt_tokens, finished.completion_tokens) == ("stop", 5, 2)


async def test_a_generation_that_ends_without_finish_reason_was_aborted() -> None:
    events = await run(ScriptedFakeEngine([Delta("a", 1)]), job())
    assert events[-1].failed.kind == Kind.FAILURE_KIND_CANCELLED


@pytest.mark.parametrize(
    ("error", "kind", "message"),
    [
        (EngineUnavailable("the engine aborted the generation"), Kind.FAILURE_KIND_UNAVAILABLE, "retry"),
        (EngineRejected("bad schema"), Kind.FAILURE_KIND_INVALID_REQUEST, "refused the request: bad schema"),
        (EngineError("repetitive output"), Kind.FAILURE_KIND_INTERNAL, "repetitive output"),
        (ValueError("boom"), Kind.FAILURE_KIND_INTERNAL, "internal error (request id r1)"),
    ],
)
async def test_engine_errors_become_failed_events(error: Exception, kind: int, message: str) -> None:
    events = await run(ScriptedFakeEngine([Delta("a", 1)], error), job())
    assert events[-1].failed.kind == kind and message in events[-1].failed.message


@pytest.mark.parametrize(
    "error",
    [
        ValueError("cannot reach redis://:hunter2@10.1.2.3:6379/0"),
        EngineDead("EngineCore at /opt/venv/lib/vllm/v1/engine/core.py died: cannot reach 10.1.2.3"),
    ],
)
async def test_the_caller_gets_the_request_id_not_the_exception_text(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = CollectingFakePublisher()
    events = JobEvents("r1", "g", 1, publisher)  # type: ignore[arg-type]
    with contextlib.suppress(EngineDead):
        await run_job(job(), ScriptedFakeEngine([Delta("a", 1)], error), events, "w1")
    message = publisher.events[-1].failed.message
    assert "10.1.2.3" not in message and "request id r1" in message, message
    assert "10.1.2.3" in caplog.text  # the detail is for whoever runs the worker


async def test_a_dead_engine_fails_the_job_and_stops_the_worker() -> None:
    publisher = CollectingFakePublisher()
    events = JobEvents("r1", "g", 1, publisher)  # type: ignore[arg-type]
    with pytest.raises(EngineDead):
        await run_job(job(), ScriptedFakeEngine([], EngineDead("gone")), events, "w1")
    assert publisher.events[-1].failed.kind == Kind.FAILURE_KIND_UNAVAILABLE


async def test_a_prompt_longer_than_the_engine_context_is_refused_before_the_engine() -> None:
    engine = ScriptedFakeEngine([Delta("a", 1, "stop")], context_window=8)
    events = await run(engine, job(prompt_tokens=8))
    failed = events[-1].failed
    assert failed.kind == Kind.FAILURE_KIND_INVALID_REQUEST and failed.field == "messages"
    assert "context window of 8 tokens" in failed.message
    assert engine.requests == []


async def test_json_mode_output_that_is_not_an_object_fails_with_the_text() -> None:
    events = await run(ScriptedFakeEngine([Delta('{"a": ', 10, "length")]), job(json_mode=True))
    failed = events[-1].failed
    assert failed.kind == Kind.FAILURE_KIND_INVALID_OUTPUT and failed.reason == "json_validate_failed"
    assert failed.failed_generation == '{"a": ' and "cut off by max_tokens" in failed.message


async def test_json_schema_travels_to_the_engine_and_checks_the_reply() -> None:
    schema = json.dumps({"type": "object", "required": ["n"]})
    engine = ScriptedFakeEngine([Delta('{"n": 1}', 4, "stop")])
    events = await run(engine, job(json_schema=schema))
    assert events[-1].HasField("finished") and engine.requests[0].params.json_schema == schema
    events = await run(ScriptedFakeEngine([Delta('{"m": 1}', 4, "stop")]), job(json_schema=schema))
    failed = events[-1].failed
    assert failed.reason == "json_validate_failed" and "'n' is a required" in failed.message


async def test_penalties_travel_to_the_engine() -> None:
    engine = ScriptedFakeEngine([Delta("a", 1, "stop")])
    await run(engine, job(frequency_penalty=1.5, presence_penalty=-0.5))
    params = engine.requests[0].params
    assert (params.frequency_penalty, params.presence_penalty) == (1.5, -0.5)


async def test_a_job_past_its_deadline_ends_deadline_exceeded() -> None:
    class SlowFakeEngine(ScriptedFakeEngine):
        async def _replay(self) -> AsyncIterator[Delta]:
            yield Delta("a", 1)
            await asyncio.sleep(5)
            yield Delta("b", 2, "stop")

    the_job = job()
    the_job.deadline = time.time() + 0.2
    events = await run(SlowFakeEngine([]), the_job)
    assert events[-1].failed.kind == Kind.FAILURE_KIND_DEADLINE_EXCEEDED


def bench_engine() -> BenchEngine:
    return BenchEngine(ModelSpec("m", ModelSpec.parse("SmolLM2-135M-Instruct").path), tokens_per_second=0)


def progress_after(tokens: int, released_chars: int, last_seq: int) -> codec.Progress:
    return codec.Progress(1, last_seq, released_chars, tuple(range(1, tokens + 1)))


async def test_a_taken_over_job_continues_after_the_tokens_already_published() -> None:
    engine = bench_engine()
    generating = engine.generate
    requests: list[GenerationRequest] = []
    engine.generate = lambda r: requests.append(r) or generating(r)  # type: ignore[method-assign]
    the_job = job(max_tokens=10, seed=7)
    # Attempt 1 published Started (seq 0) and "t1 t2 t3 " in three deltas (seq 1-3), then died.
    events = await run(engine, the_job, progress_after(3, len("t1 t2 t3 "), last_seq=3))
    started = events[0].started
    assert (events[0].seq, started.continued, started.continued_from_tokens) == (4, True, 3)
    assert texts(events) == "t4 t5 t6 t7 t8 t9 t10 "  # no token again, none missing
    assert [e.delta.completion_tokens for e in events if e.HasField("delta")] == list(range(4, 11))
    finished = events[-1].finished
    assert (finished.finish_reason, finished.completion_tokens, finished.prompt_tokens) == ("length", 10, 5)
    [request] = requests
    assert request.prompt_token_ids == [0, 1, 2, 3, 4, 1, 2, 3]  # prompt + the tokens generated
    assert (request.params.max_tokens, request.num_generated) == (7, 3)
    assert request.params.seed == continued_params(sampling_params(the_job), 3).seed != 7


async def test_a_continuation_keeps_the_penalties_and_the_benchmark_engine_ignores_them() -> None:
    engine = bench_engine()
    generating = engine.generate
    requests: list[GenerationRequest] = []
    engine.generate = lambda r: requests.append(r) or generating(r)  # type: ignore[method-assign]
    the_job = job(max_tokens=6, frequency_penalty=2.0, presence_penalty=-2.0)
    events = await run(engine, the_job, progress_after(3, len("t1 t2 t3 "), last_seq=3))
    assert texts(events) == "t4 t5 t6 "
    [request] = requests
    assert (request.params.frequency_penalty, request.params.presence_penalty) == (2.0, -2.0)


async def test_held_back_text_is_sent_first_when_the_continuation_starts() -> None:
    # Attempt 1 generated tokens 1-3 but published only "t1 t2 t" (its engine held "3 " back).
    events = await run(bench_engine(), job(max_tokens=5), progress_after(3, len("t1 t2 t"), last_seq=2))
    assert [e.delta.text for e in events if e.HasField("delta")] == ["3 ", "t4 ", "t5 "]
    assert events[1].delta.completion_tokens == 3


async def test_a_stop_sequence_across_the_boundary_ends_the_continuation() -> None:
    # "b" was held back (it may begin the stop sequence "bc"); the continuation's first token is "cd".
    engine = ScriptedFakeEngine(
        [Delta("cd", 1, token_ids=(12,)), Delta("e", 2)], text_of_tokens={10: "a", 11: "b"}
    )
    progress = codec.Progress(1, 1, len("a"), (10, 11))
    events = await run(engine, job(stop=["bc"]), progress)
    assert texts(events) == ""  # nothing after "a": the stop sequence begins right after it
    assert (events[-1].finished.finish_reason, events[-1].finished.completion_tokens) == ("stop", 3)
    assert engine.aborted == ["r1"]


async def test_held_back_text_that_is_no_stop_sequence_is_sent_with_the_next_text() -> None:
    engine = ScriptedFakeEngine(
        [Delta("x", 1, token_ids=(12,)), Delta("y", 2, "stop", (13,))], text_of_tokens={10: "a", 11: "b"}
    )
    events = await run(engine, job(stop=["bc"]), codec.Progress(1, 1, len("a"), (10, 11)))
    # Each piece is held back until the next one shows it does not begin "bc".
    assert [e.delta.text for e in events if e.HasField("delta")] == ["b", "xy"]
    assert events[-1].finished.completion_tokens == 4


async def test_a_continuation_with_no_tokens_left_finishes_at_once() -> None:
    # Prompt + reply fill the context window exactly: nothing is left to run in the engine.
    engine = ScriptedFakeEngine([], context_window=8, text_of_tokens={1: "a", 2: "b", 3: "c"})
    events = await run(engine, job(max_tokens=3), codec.Progress(1, 2, 1, (1, 2, 3)))
    assert engine.requests == []
    assert texts(events) == "bc"  # what was held back is all released at the end
    assert (events[-1].finished.finish_reason, events[-1].finished.completion_tokens) == ("length", 3)


async def test_token_ids_of_deltas_without_text_travel_with_the_next_text() -> None:
    publisher = CollectingFakePublisher()
    events = JobEvents("r1", "g", 1, publisher)  # type: ignore[arg-type]
    engine = ScriptedFakeEngine([Delta("", 1, token_ids=(5,)), Delta("ab", 2, "stop", (6,))])
    await run_job(job(), engine, events, "w1")
    assert [p.token_ids for p in publisher.progress] == [(), (5, 6), ()]


def logprob_tokens(events: list[codec.Event]) -> list[str]:
    return [entry.token for e in events if e.HasField("delta") for entry in e.delta.logprobs]


async def test_logprobs_travel_with_their_tokens_and_the_last_ones_without_text_are_sent_too() -> None:
    a, b, eos = TokenLogprob("a", -0.5), TokenLogprob("b", -1.0), TokenLogprob("</s>", float("-inf"))
    engine = ScriptedFakeEngine(
        [
            Delta("", 1, token_ids=(5,), logprobs=(a,)),
            Delta("ab", 2, None, (6,), (b,)),
            Delta("", 3, "stop", (7,), (eos,)),
        ]
    )
    publisher = CollectingFakePublisher()
    events = JobEvents("r1", "g", 1, publisher)  # type: ignore[arg-type]
    await run_job(job(logprobs=True, top_logprobs=2), engine, events, "w1")
    assert engine.requests[0].params.logprobs == 2
    deltas = [e.delta for e in publisher.events if e.HasField("delta")]
    # One entry per generated token: the end-of-sequence token's goes on a delta without text,
    # its -inf as the reference's floor; the progress record holds exactly the tokens published.
    assert [(d.text, [(x.token, x.logprob) for x in d.logprobs]) for d in deltas] == [
        ("ab", [("a", -0.5), ("b", -1.0)]),
        ("", [("</s>", -9999.0)]),
    ]
    assert [p.token_ids for p in publisher.progress] == [(), (5, 6), (7,), ()]
    assert publisher.events[-1].finished.completion_tokens == 3


async def test_without_logprobs_a_last_token_without_text_sends_no_delta() -> None:
    engine = ScriptedFakeEngine([Delta("ab", 1, None, (6,)), Delta("", 2, "stop", (7,))])
    events = await run(engine, job())
    assert engine.requests[0].params.logprobs is None
    assert [e.delta.text for e in events if e.HasField("delta")] == ["ab"]


async def test_a_continuation_sends_logprobs_only_for_the_tokens_it_generates() -> None:
    # Attempt 1 published t1-t3 with their logprobs and held "3 " back; the held-back text goes
    # out first, without entries, so the caller has one entry per token, none twice.
    events = await run(
        bench_engine(), job(max_tokens=5, logprobs=True, top_logprobs=1), progress_after(3, len("t1 t2 t"), 2)
    )
    deltas = [e.delta for e in events if e.HasField("delta")]
    assert [(d.text, len(d.logprobs)) for d in deltas] == [("3 ", 0), ("t4 ", 1), ("t5 ", 1)]
    assert logprob_tokens(events) == ["t4 ", "t5 "]
    assert [[t.token for t in d.logprobs[0].top_logprobs] for d in deltas[1:]] == [["t4 "], ["t5 "]]


async def test_n_choices_each_publish_their_own_deltas_and_finish_reason() -> None:
    engine = ScriptedFakeEngine(
        [
            Delta("a", 1, None, (1,), index=0),
            Delta("x", 1, None, (5,), index=1),
            Delta("b", 2, "stop", (2,), index=0),
            Delta("y", 2, None, (6,), index=1),
            Delta("z", 3, "length", (7,), index=1),
        ]
    )
    events = await run(engine, job(n=2, seed=7))
    assert engine.requests[0].params.n == 2
    deltas = [(e.delta.index, e.delta.text, e.delta.completion_tokens) for e in events if e.HasField("delta")]
    assert deltas == [(0, "a", 1), (1, "x", 1), (0, "b", 2), (1, "y", 2), (1, "z", 3)]
    finished = events[-1].finished
    assert (finished.finish_reason, list(finished.choice_finish_reasons)) == ("stop", ["stop", "length"])
    assert finished.completion_tokens == 5  # all choices


async def test_a_job_ends_only_when_every_choice_has_finished() -> None:
    engine = ScriptedFakeEngine([Delta("a", 1, "stop", index=0), Delta("x", 1, None, index=1)])
    events = await run(engine, job(n=2))
    assert events[-1].failed.kind == Kind.FAILURE_KIND_CANCELLED


async def test_json_mode_checks_every_choice() -> None:
    engine = ScriptedFakeEngine([Delta("{}", 1, "stop", index=0), Delta("[1]", 1, "stop", index=1)])
    events = await run(engine, job(n=2, json_mode=True))
    failed = events[-1].failed
    assert failed.reason == "json_validate_failed" and failed.failed_generation == "[1]"


async def test_the_benchmark_engine_gives_each_choice_the_same_reply() -> None:
    events = await run(bench_engine(), job(max_tokens=3, n=3))
    by_choice = {
        i: "".join(e.delta.text for e in events if e.HasField("delta") and e.delta.index == i)
        for i in range(3)
    }
    assert by_choice == {0: "t1 t2 t3 ", 1: "t1 t2 t3 ", 2: "t1 t2 t3 "}
    assert events[-1].finished.completion_tokens == 9


def test_json_mode_jobs_start_over_instead_of_continuing() -> None:
    assert can_continue(job())
    assert not can_continue(job(json_mode=True))
    assert not can_continue(job(json_schema='{"type": "object"}'))
    assert not can_continue(job(n=2))  # the progress record holds one sequence


class ToolCallingFakeEngine(ScriptedFakeEngine):
    """Reads "CALL name args" as a call in the model's own format; its schema is a marker."""

    def tool_call_schema(self, tools: ToolUse) -> str:
        return json.dumps({"type": "array", "title": f"calls {tools.choice} {tools.parallel}"})

    def extract_tool_calls(self, text: str, tools: ToolUse) -> tuple[str, list[ToolCall]]:
        if not text.startswith("CALL "):
            return text, []
        _, name, arguments = text.split(" ", 2)
        return "", [ToolCall("call_a", name, arguments)]


TOOLS = '[{"type":"function","function":{"name":"f"}}]'


async def test_an_auto_reply_with_a_call_is_published_whole_as_tool_calls() -> None:
    engine = ToolCallingFakeEngine([Delta("CALL f ", 2), Delta('{"x": 1}', 4, "stop")])
    events = await run(engine, job(tools=codec.ToolUse(definitions=TOOLS, choice="auto")))
    deltas = [e.delta for e in events if e.HasField("delta")]
    assert len(deltas) == 1  # nothing before the reply was whole
    assert [(c.id, c.name, c.arguments) for c in deltas[0].tool_calls] == [("call_a", "f", '{"x": 1}')]
    assert deltas[0].text == "" and deltas[0].completion_tokens == 4
    assert events[-1].finished.finish_reason == "tool_calls"
    assert engine.requests[0].params.json_schema == ""  # "auto" is not constrained


async def test_an_auto_reply_without_a_call_is_text_with_its_own_finish_reason() -> None:
    engine = ToolCallingFakeEngine([Delta("It is ", 2), Delta("sunny", 3, "length")])
    events = await run(engine, job(tools=codec.ToolUse(definitions=TOOLS, choice="auto")))
    assert texts(events) == "It is sunny" and events[-1].finished.finish_reason == "length"


async def test_required_is_constrained_by_the_engines_schema_and_read_as_calls() -> None:
    reply = '[{"name":"f","parameters":{"x":1}},{"name":"f","parameters":{}}]'
    engine = ToolCallingFakeEngine([Delta(reply, 9, "stop")])
    tools = codec.ToolUse(definitions=TOOLS, choice="required", parallel=True)
    events = await run(engine, job(tools=tools))
    params = engine.requests[0].params
    assert json.loads(params.json_schema)["title"] == "calls required True" and params.json_mode
    (delta,) = [e.delta for e in events if e.HasField("delta")]
    assert [(c.name, json.loads(c.arguments)) for c in delta.tool_calls] == [("f", {"x": 1}), ("f", {})]
    assert events[-1].finished.finish_reason == "tool_calls"


async def test_calls_cut_off_by_max_tokens_fail_with_tool_use_failed() -> None:
    engine = ToolCallingFakeEngine([Delta('[{"name":"f","para', 10, "length")])
    events = await run(engine, job(tools=codec.ToolUse(definitions=TOOLS, choice="required")))
    failed = events[-1].failed
    assert failed.kind == Kind.FAILURE_KIND_INVALID_OUTPUT and failed.reason == "tool_use_failed"
    assert failed.failed_generation == '[{"name":"f","para' and "cut off by max_tokens" in failed.message


async def test_an_engine_that_cannot_call_tools_refuses_the_job() -> None:
    events = await run(
        ScriptedFakeEngine([Delta("a", 1, "stop")]), job(tools=codec.ToolUse(choice="required"))
    )
    failed = events[-1].failed
    assert failed.kind == Kind.FAILURE_KIND_INVALID_REQUEST and failed.field == "tools"


def test_jobs_with_tools_start_over_instead_of_continuing() -> None:
    assert not can_continue(job(tools=codec.ToolUse(definitions=TOOLS, choice="auto")))


async def test_the_tokens_of_a_reply_with_tools_go_out_without_text_as_they_come() -> None:
    engine = ToolCallingFakeEngine(
        [Delta("CALL f ", 2, token_ids=(1, 2)), Delta("{}", 3, "stop", token_ids=(3,))]
    )
    publisher = CollectingFakePublisher()
    events = JobEvents("r1", "g", 1, publisher)  # type: ignore[arg-type]
    await run_job(job(tools=codec.ToolUse(definitions=TOOLS, choice="auto")), engine, events, "w1")
    deltas = [e.delta for e in publisher.events if e.HasField("delta")]
    assert [(d.text, d.completion_tokens, len(d.tool_calls)) for d in deltas] == [
        ("", 2, 0),
        ("", 3, 0),
        ("", 3, 1),
    ]
    # The job's progress record holds every token, so a call that ends early is charged for them.
    assert [p.token_ids for p in publisher.progress if p.token_ids] == [(1, 2), (3,)]


async def test_a_reply_that_calls_no_tool_of_the_request_fails_with_tool_use_failed() -> None:
    engine = ToolCallingFakeEngine([Delta("CALL g {}", 3, "stop")])
    events = await run(engine, job(tools=codec.ToolUse(definitions=TOOLS, choice="auto")))
    failed = events[-1].failed
    assert (
        failed.reason == "tool_use_failed"
        and "'g', which is not one of the request's tools" in failed.message
    )
    assert failed.failed_generation == "CALL g {}"
