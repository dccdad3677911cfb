"""deploy/components/redis-cluster: an overlay with it renders and validates without the base's
Redis, gateway and workers agree on REDIS_JOB_STREAMS=3, and KEDA watches every job stream the
workers read, on the nodes a REDIS_URL of the documented form names."""

import math
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common import keys
from common.redis_client import parse_cluster_url
from common.settings import job_streams
from gateway.config import GatewaySettings
from tests.deploy.manifests import OVERLAYS, REPO, container_env, find, render, render_with_component
from tests.deploy.test_manifests import CUSTOM_KINDS, KUBERNETES_VERSION
from worker.config import WorkerSettings

COMPONENT = REPO / "deploy" / "components" / "redis-cluster"
STREAMS = 3


def render_with_cluster(overlay: str, scratch: Path) -> list[dict[str, Any]]:
    return render_with_component(overlay, COMPONENT, scratch)


def env_of(objects: list[dict[str, Any]], deployment: str) -> dict[str, str]:
    [container] = find(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return container_env(objects, container)


def component_triggers() -> list[dict[str, Any]]:
    """The triggers as the component's own file spells them (before kustomize re-emits them)."""
    component = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    [scaled] = [p["patch"] for p in component["patches"] if p.get("target", {}).get("kind") == "ScaledObject"]
    [op] = yaml.safe_load(scaled)
    assert (op["op"], op["path"]) == ("replace", "/spec/triggers")
    triggers: list[dict[str, Any]] = op["value"]
    return triggers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_overlay_with_the_cluster_drops_its_redis_and_spreads_jobs_over_three_streams(
    overlay: str, tmp_path: Path
) -> None:
    objects = render_with_cluster(overlay, tmp_path)
    for obj in objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert not [
        o for o in objects if o["kind"] in ("StatefulSet", "Service") and o["metadata"]["name"] == "redis"
    ]
    # Everything else is the overlay's.
    others = {(o["kind"], o["metadata"]["name"]) for o in render(overlay)} - {
        ("StatefulSet", "redis"),
        ("Service", "redis"),
    }
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == others
    # Both processes read the same number of job streams (each from its own ConfigMap), and their
    # settings take it along with a cluster URL.
    url = "redis-cluster://:p@node-0:6379,node-1:6379,node-2:6379"
    gateway, worker = env_of(objects, "gateway"), env_of(objects, "worker")
    assert gateway["REDIS_JOB_STREAMS"] == worker["REDIS_JOB_STREAMS"] == str(STREAMS)
    assert job_streams(gateway) == job_streams(worker) == STREAMS
    assert GatewaySettings.from_env({**gateway, "REDIS_URL": url}).job_streams == STREAMS
    if overlay == "gpu":  # the GPU model directory is only in the image
        worker = {**worker, "WORKER_MODEL": "m=/models/m"}
    assert WorkerSettings.from_env({**worker, "REDIS_URL": url}).job_streams == STREAMS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_has_one_cluster_trigger_per_job_stream_the_workers_read(overlay: str, tmp_path: Path) -> None:
    objects = render_with_cluster(overlay, tmp_path)
    model = env_of(objects, "worker")["WORKER_MODEL"]
    streams = job_streams(env_of(objects, "worker"))
    triggers = find(objects, "ScaledObject", "worker")["spec"]["triggers"]
    assert [t["metadata"]["stream"] for t in triggers] == [keys.job_stream(model, k) for k in range(streams)]
    assert all(isinstance(t["metadata"]["stream"], str) for t in triggers)  # braces: not a mapping
    [before] = find(render(overlay), "ScaledObject", "worker")["spec"]["triggers"]
    lag = math.ceil(int(before["metadata"]["lagCount"]) / streams)
    [addresses] = {t["metadata"]["addresses"] for t in triggers}
    for trigger in triggers:
        assert trigger["type"] == "redis-cluster-streams"
        assert trigger["metadata"]["consumerGroup"] == keys.WORKER_GROUP
        # KEDA's metadata are strings; lagCount per stream is the one stream's divided by N.
        assert trigger["metadata"]["lagCount"] == str(lag)
        assert set(trigger["metadata"]) == {"addresses", "stream", "consumerGroup", "lagCount"}
        assert trigger["authenticationRef"] == before["authenticationRef"]
    # The nodes are host:port pairs, as redis-cluster:// names them.
    nodes = parse_cluster_url(f"redis-cluster://:p@{addresses}").nodes
    assert [f"{h}:{p}" for h, p in nodes] == addresses.split(",")
    # The TriggerAuthentication is the keda component's, untouched: the data nodes' password.
    auth = find(objects, "TriggerAuthentication", "redis-auth")["spec"]["secretTargetRef"]
    assert auth == find(render(overlay), "TriggerAuthentication", "redis-auth")["spec"]["secretTargetRef"]
    assert {(a["parameter"], a["name"], a["key"]) for a in auth} == {
        ("password", "redis-auth", "REDIS_PASSWORD")
    }


def test_the_stream_names_are_quoted_strings_in_the_component() -> None:
    """Each holds a hash tag in braces: quoted, it is a string wherever the YAML is read (flow
    style included), never a mapping."""
    text = (COMPONENT / "kustomization.yaml").read_text()
    values = re.findall(r"^\s*stream:\s*(.+?)\s*$", text, re.MULTILINE)
    assert len(values) == STREAMS
    assert all(v.startswith('"') and v.endswith('"') for v in values), values
    streams = [t["metadata"]["stream"] for t in component_triggers()]
    assert all(isinstance(s, str) for s in streams)
    assert streams == [keys.job_stream("SmolLM2-135M-Instruct", k) for k in range(STREAMS)]
    # Quoted, a name stays that string in flow style too; unquoted, it would be a mapping there.
    assert yaml.safe_load("[" + values[0] + "]") == [streams[0]]
    assert yaml.safe_load("[" + streams[0] + "]") != [streams[0]]


def test_the_documented_secret_matches_the_trigger() -> None:
    comment = (COMPONENT / "kustomization.yaml").read_text()
    [nodes] = re.findall(r"NODES=(\S+)", comment)
    [url] = re.findall(r'REDIS_URL="(redis-cluster://\S+)"', comment)
    target = parse_cluster_url(url.replace("$P", "p").replace("$NODES", nodes))
    assert [f"{h}:{p}" for h, p in target.nodes] == nodes.split(",")
    assert target.password == "p" and not target.tls
    assert {t["metadata"]["addresses"] for t in component_triggers()} == {nodes}
    # KEDA authenticates with the Secret's REDIS_PASSWORD: the comment creates it.
    assert "--from-literal=REDIS_PASSWORD=$P" in comment
