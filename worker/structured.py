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


def output_violation(text: str, params: SamplingParams) -> str:
    """Why the text breaks the requested format; "" when it is fine or no format was asked for."""
    if not (params.json_mode or params.json_schema):
        return ""
    try:
        value: Any = json.loads(text)
    except ValueError:
        return "JSON mode: the generated output is not valid JSON"
    except RecursionError:
        return "JSON mode: the generated output is nested too deeply to parse"
    if not params.json_schema:
        return "" if isinstance(value, dict) else "JSON mode: the generated output is not a JSON object"
    try:
        jsonschema.validate(value, json.loads(params.json_schema))
    except jsonschema.SchemaError as exc:
        return f"JSON Schema: the schema is not valid: {exc.message}"
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        return f"JSON Schema: the generated output does not conform at {where}: {exc.message}"
    except RecursionError:
        return "JSON Schema: the generated output is nested too deeply to check"
    except referencing.exceptions.Unresolvable as exc:
        # A $ref the schema cannot resolve (e.g. a tool's #/definitions/... once vLLM nests the
        # tool's parameters in the schema of its calls).
        return f"JSON Schema: the schema has a reference that cannot be resolved: {exc}"
    return ""
