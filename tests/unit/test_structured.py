"""A finished reply is checked against JSON mode or its JSON Schema (worker/structured.py)."""

import json

import pytest

from worker.engine.base import SamplingParams
from worker.structured import output_violation

SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
)


@pytest.mark.parametrize(
    ("text", "params", "violation"),
    [
        ("anything", SamplingParams(), ""),
        ('{"a": 1}', SamplingParams(json_mode=True), ""),
        ("[1, 2]", SamplingParams(json_mode=True), "not a JSON object"),
        ('{"a": ', SamplingParams(json_mode=True), "not valid JSON"),
        ('{"name": "Tom", "age": 3}', SamplingParams(json_schema=SCHEMA), ""),
        ('{"name": "Tom", "age": "3"}', SamplingParams(json_schema=SCHEMA), "at age: '3' is not of type"),
        ('{"name": "Tom"}', SamplingParams(json_schema=SCHEMA), "'age' is a required property"),
        ('{"name": "To', SamplingParams(json_schema=SCHEMA), "not valid JSON"),
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", SamplingParams(json_mode=True), "too deeply"),
        (
            '{"x": ' * 400 + "{}" + "}" * 400,  # parses; checking it recurses a few frames a level
            SamplingParams(json_schema=json.dumps({"properties": {"x": {"$ref": "#"}}})),
            "too deeply to check",
        ),
    ],
)
def test_output_violation(text: str, params: SamplingParams, violation: str) -> None:
    found = output_violation(text, params)
    assert (violation in found) if violation else found == ""
