"""Checks a finished reply against what JSON mode or a JSON Schema asked for.

Decoding is constrained by the engine's structured outputs, but a reply cut off by
max_tokens (or a schema feature the grammar backend cannot enforce) can still break the
contract; the caller then gets json_validate_failed with the text, as in the reference.
"""

import json
from typing import Any

import jsonschema
import referencing.exceptions

from worker.engine.base import SamplingParams


def output_violation(text: str, params: SamplingParams, subject: str = "") -> str:
    """Why the text breaks the requested format; "" when it is fine or no format was asked for.
    subject: what the message names first ("JSON mode" or "JSON Schema" unless given)."""
    why = _violation(text, params)
    if not why:
        return ""
    kind, reason = why
    return f"{subject or kind}: {reason}"


def _violation(text: str, params: SamplingParams) -> tuple[str, str] | None:
    if not (params.json_mode or params.json_schema):
        return None
    try:
        value: Any = json.loads(text)
    except ValueError:
        return "JSON mode", "the generated output is not valid JSON"
    except RecursionError:
        return "JSON mode", "the generated output is nested too deeply to parse"
    if not params.json_schema:
        return None if isinstance(value, dict) else ("JSON mode", "the generated output is not a JSON object")
    try:
        jsonschema.validate(value, json.loads(params.json_schema))
    except jsonschema.SchemaError as exc:
        return "JSON Schema", f"the schema is not valid: {exc.message}"
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        return "JSON Schema", f"the generated output does not conform at {where}: {exc.message}"
    except RecursionError:
        return "JSON Schema", "the generated output is nested too deeply to check"
    except referencing.exceptions.Unresolvable as exc:
        # A $ref the schema cannot resolve (e.g. a tool's #/definitions/... once vLLM nests the
        # tool's parameters in the schema of its calls).
        return "JSON Schema", f"the schema has a reference that cannot be resolved: {exc}"
    return None
