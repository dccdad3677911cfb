"""Settings are read from the environment once and refused with a clear message when wrong."""

from pathlib import Path

import pytest

from common.models import ModelSpec, parse_model_specs
from gateway.config import GatewaySettings
from worker.config import WorkerSettings


def test_gateway_defaults() -> None:
    settings = GatewaySettings.from_env({})
    assert settings.address == "[::]:50051"
    assert [m.name for m in settings.models] == ["SmolLM2-135M-Instruct"]
    assert settings.default_timeout_seconds == 300


def test_worker_reads_its_variables() -> None:
    settings = WorkerSettings.from_env(
        {
            "WORKER_MAX_CONCURRENCY": "4",
            "WORKER_VLLM_KV_CACHE_GIB": "1.5",
            "WORKER_VLLM_MAX_MODEL_LEN": "2048",
        }
    )
    assert settings.engine == "vllm" and settings.max_concurrency == 4
    assert settings.vllm.kv_cache_gib == 1.5 and settings.vllm.max_model_len == 2048


def test_worker_defaults_take_a_dead_workers_jobs_over_within_three_seconds() -> None:
    settings = WorkerSettings.from_env({})
    # A job is taken over once idle for the claim timeout, at the next look for orphans (every
    # heartbeat); what is left of 3 s goes to starting the continuation.
    assert settings.claim_idle_seconds + settings.heartbeat_seconds <= 2.5
    assert (
        settings.claim_idle_seconds >= 4 * settings.heartbeat_seconds
    )  # a missed heartbeat or two is no death


@pytest.mark.parametrize(("text", "eager"), [("auto", None), ("1", True), ("0", False)])
def test_enforce_eager_is_auto_by_default(text: str, eager: bool | None) -> None:
    assert WorkerSettings.from_env({}).vllm.enforce_eager is None
    assert WorkerSettings.from_env({"WORKER_VLLM_ENFORCE_EAGER": text}).vllm.enforce_eager is eager


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORKER_MAX_CONCURRENCY": "lots"}, "WORKER_MAX_CONCURRENCY must be an integer"),
        ({"WORKER_MAX_CONCURRENCY": "0"}, "WORKER_MAX_CONCURRENCY must be at least 1"),
        ({"WORKER_ENGINE": "tpu"}, "WORKER_ENGINE must be one of"),
        ({"WORKER_ENGINE": "cpu"}, "WORKER_ENGINE must be one of"),  # the transformers engine is gone
        ({"WORKER_VLLM_ENFORCE_EAGER": "yes"}, "WORKER_VLLM_ENFORCE_EAGER must be auto, 1 or 0"),
        ({"WORKER_MODEL": "other-model"}, "needs a directory"),
    ],
)
def test_bad_worker_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerSettings.from_env(env)


def test_model_specs() -> None:
    assert ModelSpec.parse("mine=/models/x").name == "mine"
    assert ModelSpec.parse("mine=/models/x").tool_parser == ""
    with_parser = ModelSpec.parse("mine=/models/x?tool_parser=hermes")
    assert (with_parser.path, with_parser.tool_parser) == (Path("/models/x"), "hermes")
    with pytest.raises(ValueError, match="unknown option 'parser'"):
        ModelSpec.parse("mine=/models/x?parser=hermes")
    with pytest.raises(ValueError, match="unique"):
        parse_model_specs("a=/x,a=/y")
    with pytest.raises(ValueError, match="no model"):
        parse_model_specs(" , ")


def test_gateway_http_address_and_model_aliases() -> None:
    settings = GatewaySettings.from_env(
        {
            "GATEWAY_HTTP_ADDRESS": "127.0.0.1:9999",
            "GATEWAY_MODEL_ALIASES": "a=SmolLM2-135M-Instruct, b = SmolLM2-135M-Instruct",
        }
    )
    assert settings.http_host_port == ("127.0.0.1", 9999)
    assert settings.aliases == {"a": "SmolLM2-135M-Instruct", "b": "SmolLM2-135M-Instruct"}
    assert GatewaySettings.from_env({}).http_host_port == (None, 8080)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GATEWAY_MODEL_ALIASES": "a=unknown-model"}, "not served"),
        ({"GATEWAY_MODEL_ALIASES": "a"}, "ALIAS=MODEL"),
        ({"GATEWAY_MODEL_ALIASES": "SmolLM2-135M-Instruct=SmolLM2-135M-Instruct"}, "already a served"),
        ({"GATEWAY_HTTP_ADDRESS": "8080"}, "HOST:PORT"),
    ],
)
def test_bad_gateway_http_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewaySettings.from_env(env)


@pytest.mark.parametrize(
    ("env", "reflection"),
    [
        ({}, True),
        ({"GATEWAY_AUTH": "on"}, False),  # it lists every service: not to callers without a key
        ({"GATEWAY_AUTH": "on", "GATEWAY_REFLECTION": "on"}, True),
        ({"GATEWAY_REFLECTION": "off"}, False),
    ],
)
def test_reflection_is_off_with_auth_unless_turned_on(env: dict[str, str], reflection: bool) -> None:
    assert GatewaySettings.from_env(env).reflection is reflection


def test_the_no_worker_policy_defaults_to_refuse_and_takes_only_refuse_or_queue() -> None:
    settings = GatewaySettings.from_env({})
    assert (settings.no_worker_policy, settings.no_worker_grace_seconds) == ("refuse", 10.0)
    assert GatewaySettings.from_env({"GATEWAY_NO_WORKER": "queue"}).no_worker_policy == "queue"
    with pytest.raises(ValueError, match="GATEWAY_NO_WORKER"):
        GatewaySettings.from_env({"GATEWAY_NO_WORKER": "wait"})


def test_a_submit_wait_longer_than_half_the_redis_timeout_is_refused() -> None:
    # WAIT's reply is read under the command timeout: a longer wait would fail every submit that
    # waits it out, instead of queueing the job "anyway" as the setting promises.
    env = {
        "GATEWAY_SUBMIT_REPLICAS": "1",
        "GATEWAY_SUBMIT_WAIT_MS": "1500",
        "GATEWAY_REDIS_TIMEOUT_SECONDS": "2",
    }
    with pytest.raises(ValueError, match="GATEWAY_SUBMIT_WAIT_MS"):
        GatewaySettings.from_env(env)
    assert GatewaySettings.from_env({**env, "GATEWAY_SUBMIT_WAIT_MS": "1000"}).submit_wait_ms == 1000
