"""JSON Schemas that callers send (response_format's, tools' parameters), parsed and checked."""

import json
from typing import Any

import jsonschema

from gateway.errors import InvalidField


def parse_schema(text: str, field: str, max_depth: int | None = None) -> dict[str, Any]:
    """The schema in `text`, an object that is a valid JSON Schema (nested at most max_depth
    levels, checked first); else InvalidField on `field`."""
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidField(field, f"must be valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidField(field, f"must be a JSON Schema object, got {type(schema).__name__}")
    if max_depth is not None:
        check_depth(schema, field, max_depth)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidField(field, f"is not a valid JSON Schema: {exc.message[:200]}") from None
    except RecursionError:
        raise InvalidField(field, "is nested too deeply to check") from None
    return schema


def check_depth(value: object, field: str, max_depth: int) -> None:
    """Refuses JSON nested deeper than max_depth (checked without recursion)."""
    level = [value]
    for _ in range(max_depth + 1):
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())
        ]
        if not level:
            return
    raise InvalidField(field, f"may be nested at most {max_depth} levels deep")
