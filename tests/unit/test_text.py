"""Stop sequences of the benchmark engine (worker/engine/text.py)."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.engine.text import StopMatcher


def feed_all(matcher: StopMatcher, pieces: list[str]) -> str:
    out = "".join(matcher.feed(p) for p in pieces)
    return out + matcher.flush()


@pytest.mark.parametrize(
    ("pieces", "stop", "expected"),
    [
        (["1, 2, 3", ", 4, 5", ", 6, 7"], [", 6"], "1, 2, 3, 4, 5"),
        (["1, 2, 3, 4, 5,", " ", "6"], [", 6"], "1, 2, 3, 4, 5"),  # split across three pieces
        (["abc"], ["x"], "abc"),  # no match: everything comes out at the end
        (["hello wor", "ld!"], ["world", "wor"], "hello "),  # the earliest match wins
        (["STOP"], ["STOP"], ""),
        (["a,", " b"], [", 6"], "a, b"),  # a partial match that does not complete is released
    ],
)
def test_stop_matcher_cuts_before_the_first_stop_sequence(
    pieces: list[str], stop: list[str], expected: str
) -> None:
    assert feed_all(StopMatcher(stop), pieces) == expected


def test_stop_matcher_reports_the_match_and_emits_nothing_after_it() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("one END two") == "one "
    assert matcher.matched
    assert matcher.feed("more") == "" and matcher.flush() == ""


@given(text=st.text(alphabet="ab, 6", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_stop_matcher_output_does_not_depend_on_how_text_is_split(text: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    expected = text.split(", 6")[0]
    assert feed_all(StopMatcher([", 6"]), pieces) == expected
