"""deploy/components/tracing: an overlay with it renders, validates, and points gateway and workers
at the Collector it ships; Grafana gets a Tempo data source the Prometheus exemplars link to."""

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common import tracing
from tests.deploy.manifests import (
    OVERLAYS,
    REPO,
    container_env,
    find,
    render_with_component,
    settings_read_by_code,
)
from tests.deploy.test_manifests import CUSTOM_KINDS, KUBERNETES_VERSION, containers

COMPONENT = REPO / "deploy" / "components" / "tracing"


def render_with_tracing(overlay: str, scratch: Path) -> list[dict[str, Any]]:
    return render_with_component(overlay, COMPONENT, scratch)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_overlay_with_tracing_validates_and_exports_to_its_collector(overlay: str, tmp_path: Path) -> None:
    objects = render_with_tracing(overlay, tmp_path)
    for obj in objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    collector = find(objects, "Deployment", "otel-collector")
    service = find(objects, "Service", "otel-collector")
    assert collector["metadata"]["namespace"] == service["metadata"]["namespace"] == "chat"
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "otlp-grpc")
    read = settings_read_by_code()
    for workload, container in containers(objects):
        name = workload["metadata"]["name"]
        env = container_env(objects, container)
        if name in ("gateway", "worker"):
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{grpc_port}"
            assert tracing.Tracing.from_env("x", {**env, "OTEL_SDK_DISABLED": "true"}) is tracing.OFF
            assert set(env) <= read, f"{name} sets variables no code reads: {set(env) - read}"
        if name == "otel-collector":
            assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_collector_forwards_otlp_traces_through_a_batch() -> None:
    [config_map] = [
        doc
        for doc in yaml.safe_load_all((COMPONENT / "otel-collector.yaml").read_text())
        if doc["kind"] == "ConfigMap"
    ]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and "batch" in pipeline["processors"]
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")


def test_grafana_links_exemplars_to_the_tempo_data_source() -> None:
    provisioning = yaml.safe_load(
        (REPO / "deploy" / "grafana" / "provisioning" / "datasources.yaml").read_text()
    )
    sources = {s["name"]: s for s in provisioning["datasources"]}
    tempo = next(s for s in sources.values() if s["type"] == "tempo")
    destinations = sources["Prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    # The label name is the one gateway/metrics.py puts on its exemplars.
    assert destinations == [{"name": "trace_id", "datasourceUid": tempo["uid"]}]
