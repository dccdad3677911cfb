"""The docs name only what exists: every `make` target, setting and metric they mention is
real, and every setting the code reads and every metric it defines is documented.

The docs are README.md and docs/*.md (generated benchmark pages included). Settings are the
string literals gateway/, worker/, common/ and devstack/ read from the environment (and, for
names the docs may mention, those the deploy manifests define); metrics are what
gateway/metrics.py and worker/metrics.py define.
"""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("gateway", "worker", "common", "devstack")
SETTING = re.compile(r"\b((?:GATEWAY|WORKER|REDIS)_[A-Z0-9_]*[A-Z0-9])\b")
METRIC = re.compile(r"\b(chat_(?:gateway|worker)_[a-z0-9_]*[a-z0-9])\b")
MAKE_TARGET = re.compile(r"`make ([a-z][a-z0-9-]*)")
# Suffixes Prometheus adds to a family's samples, which the docs may quote.
SAMPLE_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created", "_info")


def docs_text() -> str:
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    return "\n".join(page.read_text() for page in pages)


def code_text() -> str:
    return "\n".join(p.read_text() for d in CODE_DIRS for p in sorted((REPO / d).rglob("*.py")))


def settings_read_by_code() -> set[str]:
    """Names the code passes as string literals: env_str(env, "NAME", ...), env.get("NAME"), ..."""
    return set(re.findall(r"[\"']((?:GATEWAY|WORKER|REDIS)_[A-Z0-9_]+)[\"']", code_text()))


def defined_metrics() -> set[str]:
    """Every metric name the two metrics modules define (each name is a string literal there)."""
    source = (REPO / "gateway" / "metrics.py").read_text() + (REPO / "worker" / "metrics.py").read_text()
    return set(re.findall(r"[\"'](chat_(?:gateway|worker)_[a-z0-9_]+)[\"']", source))


def family(sample: str) -> str:
    for suffix in SAMPLE_SUFFIXES:
        if sample.endswith(suffix):
            return sample.removesuffix(suffix)
    return sample


def test_every_make_target_the_docs_name_exists() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, re.MULTILINE))
    named = set(MAKE_TARGET.findall(docs_text()))
    assert named - targets == set(), f"the docs name make targets the Makefile lacks: {named - targets}"


def settings_of_the_manifests() -> set[str]:
    """Names the deploy manifests define for themselves (a Secret's REDIS_PASSWORD, ...)."""
    text = "\n".join(p.read_text() for p in sorted((REPO / "deploy").rglob("*.yaml")))
    return set(SETTING.findall(text))


def test_every_setting_the_docs_name_is_read_by_the_code() -> None:
    named = set(SETTING.findall(docs_text()))
    unknown = named - settings_read_by_code() - settings_of_the_manifests()
    assert not unknown, f"the docs name settings neither the code nor the manifests read: {sorted(unknown)}"


def test_every_setting_the_code_reads_is_documented() -> None:
    undocumented = settings_read_by_code() - set(SETTING.findall(docs_text()))
    assert not undocumented, f"settings read by the code but not documented: {sorted(undocumented)}"


def test_every_metric_the_docs_name_exists() -> None:
    defined = {family(n) for n in defined_metrics()}
    named = {family(n) for n in METRIC.findall(docs_text())}
    assert named - defined == set(), f"the docs name metrics that do not exist: {sorted(named - defined)}"


def test_every_metric_is_documented() -> None:
    named = {family(n) for n in METRIC.findall(docs_text())}
    undocumented = {family(n) for n in defined_metrics()} - named
    assert not undocumented, f"metrics defined but not documented: {sorted(undocumented)}"
