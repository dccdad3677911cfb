"""response_format json_schema: checked by the gateway and carried to the job (gateway/validation.py)."""

import json

import pytest

from chat.v1 import chat_pb2
from common.models import ModelSpec
from gateway.catalog import ModelCatalog
from gateway.errors import InvalidField
from gateway.validation import validate
from tests.integration.stack import MODEL, chat_request

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.fixture(scope="module")
def catalog() -> ModelCatalog:
    return ModelCatalog.load((ModelSpec.parse(MODEL),))


def with_schema(schema_text: str | None, kind: str = "json_schema") -> chat_pb2.ChatCompletionRequest:
    request = chat_request("hi")
    request.response_format.type = kind
    if schema_text is not None:
        request.response_format.json_schema.name = "person"
        request.response_format.json_schema.schema = schema_text
        request.response_format.json_schema.strict = True
    return request


def test_a_schema_is_carried_as_json_text_with_json_mode(catalog: ModelCatalog) -> None:
    valid = validate(with_schema(json.dumps(SCHEMA)), catalog, 10)
    assert json.loads(valid.json_schema) == SCHEMA and valid.json_mode


def test_json_object_carries_no_schema(catalog: ModelCatalog) -> None:
    valid = validate(chat_request("hi", response_format="json_object"), catalog, 10)
    assert valid.json_mode and valid.json_schema == ""


@pytest.mark.parametrize(
    ("schema_text", "kind", "field", "words"),
    [
        ("{not json", "json_schema", "response_format.json_schema.schema", "valid JSON"),
        ("[1, 2]", "json_schema", "response_format.json_schema.schema", "JSON Schema object, got list"),
        # Valid JSON but no JSON Schema: vLLM would refuse it only once the job reached a worker.
        (
            '{"type": "nonsense"}',
            "json_schema",
            "response_format.json_schema.schema",
            "not a valid JSON Schema",
        ),
        (
            '{"minLength": "5"}',
            "json_schema",
            "response_format.json_schema.schema",
            "not a valid JSON Schema",
        ),
        # Deep enough to exhaust the meta-schema check's recursion, not JSON parsing's.
        (
            '{"items": ' * 200 + "{}" + "}" * 200,
            "json_schema",
            "response_format.json_schema.schema",
            "nested too deeply",
        ),
        ("", "json_schema", "response_format.json_schema.schema", "is required"),
        (None, "json_schema", "response_format.json_schema.schema", "is required"),
        (json.dumps(SCHEMA), "json_object", "response_format.json_schema", "only allowed with type"),
    ],
)
def test_bad_schemas_are_refused_naming_the_field(
    catalog: ModelCatalog, schema_text: str | None, kind: str, field: str, words: str
) -> None:
    with pytest.raises(InvalidField) as caught:
        validate(with_schema(schema_text, kind), catalog, 10)
    assert caught.value.field == field and words in caught.value.message


def test_json_schema_with_stop_is_refused(catalog: ModelCatalog) -> None:
    request = with_schema(json.dumps(SCHEMA))
    request.stop.append("x")
    with pytest.raises(InvalidField) as caught:
        validate(request, catalog, 10)
    assert caught.value.field == "stop"


def test_the_client_sends_the_reference_json_schema_dict_as_text() -> None:
    from chat_client.request import build_request

    request = build_request(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": SCHEMA, "strict": True},
        },
    )
    assert request.response_format.json_schema.name == "p" and request.response_format.json_schema.strict
    assert json.loads(request.response_format.json_schema.schema) == SCHEMA
