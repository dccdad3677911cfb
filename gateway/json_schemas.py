"""JSON Schemas that callers send (response_format's, tools' parameters), parsed and checked."""

import json
from typing import Any

import jsonschema

from gateway.errors import InvalidField


def parse_schema(text: str, field: str) -> dict[str, Any]:
    """The schema in `text`, an object that is a valid JSON Schema; else InvalidField on `field`."""
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidField(field, f"must be valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidField(field, f"must be a JSON Schema object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidField(field, f"is not a valid JSON Schema: {exc.message[:200]}") from None
    except RecursionError:
        raise InvalidField(field, "is nested too deeply to check") from None
    return schema
