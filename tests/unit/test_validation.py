"""Request validation rules (gateway/validation.py), one case per rule."""

import json

import pytest

from chat.v1 import chat_pb2
from common.models import ModelSpec
from gateway.catalog import ModelCatalog
from gateway.config import GatewaySettings
from gateway.errors import InvalidField, ModelNotFound, UnsupportedParameter
from gateway.http import parse_request
from gateway.validation import Limits, validate
from tests.integration.stack import chat_request

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def catalog() -> ModelCatalog:
    return ModelCatalog.load((ModelSpec.parse(MODEL),))


def request(**fields: object) -> chat_pb2.ChatCompletionRequest:
    return chat_request("hi", **fields)


def test_defaults(catalog: ModelCatalog) -> None:
    valid = validate(request(), catalog, default_max_tokens=100)
    assert valid.temperature == 1.0 and valid.top_p == 1.0 and valid.max_tokens == 100
    assert valid.seed is None and valid.stop == () and not valid.json_mode
    assert valid.frequency_penalty == 0.0 and valid.presence_penalty == 0.0
    assert len(valid.prompt_token_ids) > 5


def test_temperature_zero_is_kept_not_defaulted(catalog: ModelCatalog) -> None:
    assert validate(request(temperature=0.0), catalog, 100).temperature == 0.0


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [-2.0, -0.5, 0.0, 2.0])
def test_penalties_anywhere_in_their_range_reach_the_valid_request(
    catalog: ModelCatalog, field: str, value: float
) -> None:
    valid = validate(request(**{field: value}), catalog, 100)
    other = "presence_penalty" if field == "frequency_penalty" else "frequency_penalty"
    assert (getattr(valid, field), getattr(valid, other)) == (value, 0.0)  # unset: 0


def test_logprobs_and_top_logprobs_reach_the_valid_request(catalog: ModelCatalog) -> None:
    assert (validate(request(), catalog, 10).logprobs, validate(request(), catalog, 10).top_logprobs) == (
        False,
        0,
    )
    valid = validate(request(logprobs=True, top_logprobs=20), catalog, 10)
    assert (valid.logprobs, valid.top_logprobs) == (True, 20)
    valid = validate(request(logprobs=False, top_logprobs=0), catalog, 10)  # 0 asks for nothing more
    assert (valid.logprobs, valid.top_logprobs) == (False, 0)


def test_n_up_to_the_gateways_limit_reaches_the_valid_request(catalog: ModelCatalog) -> None:
    assert validate(request(), catalog, 10).n == 1
    assert validate(request(n=8), catalog, 10).n == 8
    with pytest.raises(InvalidField) as caught:
        validate(request(n=3), catalog, 10, Limits(max_choices=2))
    assert caught.value.message == "`n` must be in [1, 2], got 3"


@pytest.mark.parametrize(
    ("tier", "served"),
    [("auto", "on_demand"), ("on_demand", "on_demand"), ("default", "on_demand"), ("flex", "flex")],
)
def test_each_service_tier_is_served_by_its_lane(catalog: ModelCatalog, tier: str, served: str) -> None:
    assert validate(request(service_tier=tier), catalog, 10).service_tier == served
    assert validate(request(), catalog, 10).service_tier == "on_demand"


@pytest.mark.parametrize("tier", ["performance", "scale", ""])
def test_other_service_tiers_are_refused_by_name(catalog: ModelCatalog, tier: str) -> None:
    with pytest.raises(UnsupportedParameter) as caught:
        validate(request(service_tier=tier), catalog, 10)
    assert caught.value.field == "service_tier" and "auto, default, on_demand, flex" in caught.value.message


def test_top_logprobs_without_logprobs_says_what_it_needs(catalog: ModelCatalog) -> None:
    with pytest.raises(InvalidField) as caught:
        validate(request(top_logprobs=5), catalog, 10)
    assert caught.value.message == "`top_logprobs` requires logprobs to be true"


def test_default_max_tokens_is_capped_by_the_context_window(catalog: ModelCatalog) -> None:
    valid = validate(request(), catalog, default_max_tokens=100_000)
    assert len(valid.prompt_token_ids) + valid.max_tokens == 8192


def test_negative_seed_becomes_uint64(catalog: ModelCatalog) -> None:
    assert validate(request(seed=-1), catalog, 10).seed == 2**64 - 1


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(temperature=2.01), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=-1.0), "top_p"),
        (dict(frequency_penalty=2.01), "frequency_penalty"),
        (dict(frequency_penalty=-2.01), "frequency_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(frequency_penalty=float("-inf")), "frequency_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(presence_penalty=-3.0), "presence_penalty"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
        (dict(presence_penalty=float("inf")), "presence_penalty"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=8192), "max_tokens"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(stop=[""]), "stop[0]"),
        (dict(response_format="xml"), "response_format.type"),
        (dict(response_format=""), "response_format.type"),
        (dict(response_format="json_object", stop=["x"]), "stop"),
        (dict(model=""), "model"),
        (dict(stop=["ok", "s" * 257]), "stop[1]"),
        (dict(messages=[chat_pb2.ChatMessage(role="user", content="hi", name="n" * 65)]), "messages[0].name"),
        (dict(user="u" * 257), "user"),
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(logprobs=True, top_logprobs=-1), "top_logprobs"),
        (dict(top_logprobs=1), "top_logprobs"),
        (dict(n=0), "n"),
        (dict(n=9), "n"),
        (dict(n=-1), "n"),
    ],
)
def test_each_rule_names_its_field(catalog: ModelCatalog, fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidField) as caught:
        validate(request(**fields), catalog, 10)
    assert caught.value.field == field
    assert caught.value.message.startswith(f"`{field}` ")


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize(("value", "shown"), [(2.5, "2.5"), (float("nan"), "nan"), (float("-inf"), "-inf")])
def test_a_penalty_out_of_range_names_the_range_and_the_value(
    catalog: ModelCatalog, field: str, value: float, shown: str
) -> None:
    with pytest.raises(InvalidField) as caught:
        validate(request(**{field: value}), catalog, 10)
    assert caught.value.message == f"`{field}` must be in [-2, 2], got {shown}"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_non_finite_penalty_in_an_http_body_is_refused(catalog: ModelCatalog, literal: str) -> None:
    # Python's JSON parser takes these literals (1e400 overflows to inf); validation refuses them.
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    body = body.removesuffix("}") + f', "frequency_penalty": {literal}}}'
    parsed, _ = parse_request(json.loads(body))
    with pytest.raises(InvalidField) as caught:
        validate(parsed, catalog, 10)
    assert caught.value.field == "frequency_penalty"


def test_unknown_model(catalog: ModelCatalog) -> None:
    with pytest.raises(ModelNotFound):
        validate(request(model="nope"), catalog, 10)


def test_roles_and_messages(catalog: ModelCatalog) -> None:
    empty = chat_pb2.ChatCompletionRequest(model=MODEL)
    with pytest.raises(InvalidField, match="at least one"):
        validate(empty, catalog, 10)
    bad = request()
    bad.messages.add(role="function", content="x")
    with pytest.raises(InvalidField) as caught:
        validate(bad, catalog, 10)
    assert caught.value.field == "messages[1].role"


def test_prompt_longer_than_the_context_window(catalog: ModelCatalog) -> None:
    long = chat_pb2.ChatCompletionRequest(model=MODEL)
    long.messages.add(role="user", content="word " * 9000)
    with pytest.raises(InvalidField) as caught:
        validate(long, catalog, 10)
    assert caught.value.field == "messages" and "8192" in caught.value.message


LONGEST = dict(
    stop=["s" * 256] * 4,
    messages=[chat_pb2.ChatMessage(role="user", content="hi", name="n" * 64)],
    user="u" * 256,
)


def test_strings_at_their_limits_are_accepted(catalog: ModelCatalog) -> None:
    valid = validate(request(**LONGEST), catalog, 10)
    assert valid.stop == ("s" * 256,) * 4 and valid.user == "u" * 256


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        (Limits(max_stop_chars=255), "stop[0]"),
        (Limits(max_name_chars=63), "messages[0].name"),
        (Limits(max_user_chars=255), "user"),
    ],
)
def test_string_limits_come_from_settings(catalog: ModelCatalog, limits: Limits, field: str) -> None:
    with pytest.raises(InvalidField) as caught:
        validate(request(**LONGEST), catalog, 10, limits)
    assert caught.value.field == field and "at most" in caught.value.rule


def test_limits_are_built_from_the_gateway_settings() -> None:
    env = {"GATEWAY_MAX_STOP_CHARS": "7", "GATEWAY_MAX_NAME_CHARS": "8", "GATEWAY_MAX_USER_CHARS": "9"}
    limits = Limits.from_settings(GatewaySettings.from_env(env))
    assert (limits.max_stop_chars, limits.max_name_chars, limits.max_user_chars) == (7, 8, 9)


@pytest.mark.parametrize(
    "fields",
    [
        dict(model="m" * 100_000),
        dict(messages=[chat_pb2.ChatMessage(role="r" * 100_000, content="hi")]),
        dict(response_format="x" * 100_000),
    ],
)
def test_refusals_repeat_only_a_little_of_a_huge_value(
    catalog: ModelCatalog, fields: dict[str, object]
) -> None:
    with pytest.raises(InvalidField) as caught:
        validate(request(**fields), catalog, 10)
    assert len(caught.value.message) < 300
