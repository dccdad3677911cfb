"""The Kustomize overlays render, validate against the Kubernetes schema, and agree with the code."""

from typing import Any

import kubernetes_validate
import pytest

from common import keys
from gateway.config import GatewaySettings
from tests.deploy.manifests import OVERLAYS, REPO, container_env, find, render, settings_read_by_code
from worker.config import WorkerSettings

KUBERNETES_VERSION = "1.30.0"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}
WORKLOADS = ("Deployment", "StatefulSet")


def containers(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (o, c) for o in objects if o["kind"] in WORKLOADS for c in o["spec"]["template"]["spec"]["containers"]
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schema(overlay: str) -> None:
    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    assert {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "ScaledObject"} <= kinds
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:  # no schema offline: check the shape we rely on
            assert obj["apiVersion"].split("/")[0] in ("monitoring.coreos.com", "keda.sh") and obj["spec"]
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_have_limits_and_a_restrictive_security_context(overlay: str) -> None:
    for workload, container in containers(render(overlay)):
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(
            resources["limits"]
        )
        pod = workload["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault"
        own = container["securityContext"]
        assert own["allowPrivilegeEscalation"] is False and own["readOnlyRootFilesystem"] is True
        assert own["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_a_manifest_sets_is_read_by_the_code(overlay: str) -> None:
    objects = render(overlay)
    read = settings_read_by_code()
    for workload, container in containers(objects):
        env = set(container_env(objects, container))
        if workload["metadata"]["name"] == "redis":
            assert env == {"REDIS_PASSWORD"}  # used in redis-server's own arguments
            continue
        assert env <= read, f"{workload['metadata']['name']} sets variables no code reads: {env - read}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_settings_in_the_manifests_are_valid_and_agree_with_ports_and_probes(overlay: str) -> None:
    objects = render(overlay)
    gateway = find(objects, "Deployment", "gateway")
    [container] = gateway["spec"]["template"]["spec"]["containers"]
    settings = GatewaySettings.from_env({**container_env(objects, container), "REDIS_URL": "redis://x"})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == int(settings.address.rsplit(":", 1)[1])
    assert ports["metrics"] == settings.metrics_port
    assert ports["http"] == settings.http_host_port[1]
    scheme = "HTTPS" if settings.tls_cert_file else "HTTP"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http", "scheme": scheme}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": scheme}
    assert (
        gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings.shutdown_grace_seconds
    )
    assert container["image"] == "chat-service/gateway:0.1.0"

    worker = find(objects, "Deployment", "worker")
    [container] = worker["spec"]["template"]["spec"]["containers"]
    env = container_env(objects, container)
    if overlay == "cpu":  # the bundled model
        worker_settings = WorkerSettings.from_env({**env, "REDIS_URL": "redis://x"})
        assert worker_settings.engine == "vllm" and worker_settings.vllm.enforce_eager
    else:  # the GPU model directory is only in the image; check the rest of the settings
        worker_settings = WorkerSettings.from_env(
            {**env, "WORKER_MODEL": "m=/models/m", "REDIS_URL": "redis://x"}
        )
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > worker_settings.drain_seconds
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[
        "metrics"
    ] == worker_settings.metrics_port
    assert container["image"] == f"chat-service/worker-{overlay}:0.1.0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_have_a_service_of_their_own_never_the_apis(overlay: str) -> None:
    objects = render(overlay)
    api = find(objects, "Service", "gateway")["spec"]["ports"]
    assert {p["name"] for p in api} == {"grpc", "http"}  # what an ingress or load balancer points at
    metrics = find(objects, "Service", "gateway-metrics")
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == ["metrics"]
    assert metrics["spec"]["selector"] == {"app.kubernetes.io/name": "gateway"}
    # The ServiceMonitor scrapes the metrics Services, and only them.
    monitor = find(objects, "ServiceMonitor", "chat-service")["spec"]
    wanted = monitor["selector"]["matchLabels"]
    scraped = [
        o for o in objects if o["kind"] == "Service" and wanted.items() <= o["metadata"]["labels"].items()
    ]
    assert {o["metadata"]["name"] for o in scraped} == {"gateway-metrics", "worker-metrics"}
    # The network policy lets anyone reach the API ports, and only Prometheus' namespace the metrics.
    rules = find(objects, "NetworkPolicy", "gateway")["spec"]["ingress"]
    open_rules = [r for r in rules if "from" not in r]
    assert {p["port"] for r in open_rules for p in r["ports"]} == {"grpc", "http"}
    [scrape] = [r for r in rules if "from" in r]
    assert [p["port"] for p in scrape["ports"]] == ["metrics"] and scrape["from"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_with_auth_on_the_gateway_serves_tls_from_a_secret(overlay: str) -> None:
    objects = render(overlay)
    gateway = find(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    [container] = gateway["containers"]
    settings = GatewaySettings.from_env({**container_env(objects, container), "REDIS_URL": "redis://x"})
    assert settings.auth and settings.tls_cert_file and settings.tls_key_file  # keys never in clear
    secrets = {v["name"]: v["secret"]["secretName"] for v in gateway["volumes"] if "secret" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"] if m["name"] in secrets}
    for path in (settings.tls_cert_file, settings.tls_key_file):
        [folder] = [f for f in mounts if path.startswith(f + "/")]
        assert secrets[mounts[folder]] == "gateway-tls"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_shipped_secret_holds_a_password(overlay: str) -> None:
    """The Redis password is the operator's (docs/operating.md: Deploying): no default that works anywhere."""
    objects = render(overlay)
    for secret in (o for o in objects if o["kind"] == "Secret"):
        values = {**secret.get("stringData", {}), **secret.get("data", {})}
        assert not {"REDIS_PASSWORD", "REDIS_URL"} & set(values), secret["metadata"]["name"]
    redis = find(objects, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "REDIS_PASSWORD"}
    # An empty password would start Redis without one: the container refuses to start instead.
    assert "REDIS_PASSWORD" in " ".join(redis["command"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_on_the_job_stream_the_workers_read(overlay: str) -> None:
    objects = render(overlay)
    [trigger] = find(objects, "ScaledObject", "worker")["spec"]["triggers"]
    model = container_env(
        objects, find(objects, "Deployment", "worker")["spec"]["template"]["spec"]["containers"][0]
    )
    assert trigger["metadata"]["stream"] == keys.job_stream(model["WORKER_MODEL"])
    assert trigger["metadata"]["consumerGroup"] == keys.WORKER_GROUP


def test_gpu_workers_request_a_gpu_and_tolerate_gpu_nodes() -> None:
    pod = find(render("gpu"), "Deployment", "worker")["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_redis_keeps_accepted_jobs_with_aof() -> None:
    redis = find(render("cpu"), "StatefulSet", "redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]


def test_redis_memory_is_bounded_and_never_evicts() -> None:
    redis = find(render("cpu"), "StatefulSet", "redis")
    [container] = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = args[args.index("--maxmemory") + 1]
    assert maxmemory.endswith("mb")
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and int(maxmemory[:-2]) < int(limit[:-2]) * 1024


def test_each_image_has_a_dockerfile() -> None:
    images = {c["image"].split(":")[0] for o in OVERLAYS for _, c in containers(render(o))} - {"redis"}
    for image in images:
        assert (REPO / "deploy" / "docker" / f"{image.split('/')[-1]}.Dockerfile").exists(), image
