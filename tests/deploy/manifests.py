"""Rendering the Kustomize overlays and reading what the code expects of them."""

import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = ["cpu", "gpu"]
# Settings readers take (env, "NAME", ...); other code reads os.environ.get("NAME").
_READS = re.compile(r'\w+\(\s*env,\s*"([A-Z0-9_]+)"|environ\.get\("([A-Z0-9_]+)"')


@cache
def render(overlay: str) -> list[dict[str, Any]]:
    return _kustomize(REPO / "deploy" / "overlays" / overlay)


def render_with_component(overlay: str, component: Path, scratch: Path) -> list[dict[str, Any]]:
    """The overlay plus a component after its own, as an operator adds it (in a kustomization
    written to scratch: kustomize wants relative paths)."""
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(REPO / "deploy" / "overlays" / overlay, scratch)],
        "components": [os.path.relpath(component, scratch)],
    }
    (scratch / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return _kustomize(scratch)


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert kubectl, "kubectl not found (make setup installs it into .venv)"
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [obj] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def settings_read_by_code() -> set[str]:
    """Environment variables the gateway, worker and shared code read."""
    names = set()
    for folder in ("gateway", "worker", "common"):
        for path in (REPO / folder).rglob("*.py"):
            for match in _READS.finditer(path.read_text()):
                names.add(match.group(1) or match.group(2))
    return names


def container_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """Every variable a container gets: envFrom ConfigMaps and env entries (secret values as '<secret>')."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", "<secret>")
    return env
