"""deploy/components/redis-sentinel: an overlay with it renders and validates without the base's
Redis, and KEDA watches the job stream through the same sentinels a REDIS_URL of the documented
form names."""

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common.redis_client import parse_sentinel_url
from tests.deploy.manifests import OVERLAYS, REPO, find, render, render_with_component
from tests.deploy.test_manifests import CUSTOM_KINDS, KUBERNETES_VERSION

COMPONENT = REPO / "deploy" / "components" / "redis-sentinel"


def render_with_sentinel(overlay: str, scratch: Path) -> list[dict[str, Any]]:
    return render_with_component(overlay, COMPONENT, scratch)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_overlay_with_sentinel_drops_its_redis_and_scales_through_the_sentinels(
    overlay: str, tmp_path: Path
) -> None:
    objects = render_with_sentinel(overlay, tmp_path)
    for obj in objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert not [o for o in objects if o["metadata"]["name"] == "redis"]
    # Everything else is the overlay's, unchanged but for KEDA's trigger and its authentication.
    others = {(o["kind"], o["metadata"]["name"]) for o in render(overlay)} - {
        ("StatefulSet", "redis"),
        ("Service", "redis"),
    }
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == others
    [trigger] = find(objects, "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["type"] == "redis-sentinel-streams"
    metadata = trigger["metadata"]
    before = find(render(overlay), "ScaledObject", "worker")["spec"]["triggers"][0]["metadata"]
    assert {k: metadata[k] for k in ("stream", "consumerGroup", "lagCount")} == {
        k: before[k] for k in ("stream", "consumerGroup", "lagCount")
    }
    # The REDIS_URL the component's comment builds reaches the sentinels and service KEDA asks.
    url = f"redis+sentinel://:p@{metadata['addresses']}/{metadata['sentinelMaster']}/0?sentinel_password=s"
    target = parse_sentinel_url(url)
    assert [f"{h}:{p}" for h, p in target.sentinels] == metadata["addresses"].split(",")
    assert target.service_name == metadata["sentinelMaster"]
    auth = find(objects, "TriggerAuthentication", "redis-auth")["spec"]["secretTargetRef"]
    assert {(a["parameter"], a["key"]) for a in auth} == {
        ("password", "REDIS_PASSWORD"),
        ("sentinelPassword", "REDIS_SENTINEL_PASSWORD"),
    }


def test_the_documented_secret_matches_the_trigger() -> None:
    comment = (COMPONENT / "kustomization.yaml").read_text()
    [sentinels] = re.findall(r"SENTINELS=(\S+)", comment)
    [service] = re.findall(r"\$SENTINELS/(\w+)/0", comment)
    component = yaml.safe_load(comment)
    [scaled] = [p["patch"] for p in component["patches"] if p.get("target", {}).get("kind") == "ScaledObject"]
    values = {op["path"].rsplit("/", 1)[1]: op.get("value") for op in yaml.safe_load(scaled)}
    assert (values["addresses"], values["sentinelMaster"]) == (sentinels, service)
