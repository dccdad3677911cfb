"""The proto contract is checked by buf (`make lint`): lint, and no breaking change since the
previous commit. These tests run the same buf on a copy of proto/ in a scratch git repository,
to show that a renumbered or removed field fails the check and an added one passes."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUF = REPO / ".tools" / "node_modules" / ".bin" / "buf"  # installed by `make lint` / `make test`
PROTO = Path("proto/chat/v1/chat.proto")
# make test and make lint install buf first; a bare pytest run without it says so.
pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf is not installed: `make test` installs it")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A git repository holding the project's buf.yaml and proto/, committed once."""
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "."],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "contract"],
    ):
        assert run(*command, cwd=tmp_path).returncode == 0
    return tmp_path


def commit_change(repo: Path, old: str, new: str) -> None:
    path = repo / PROTO
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "change", cwd=repo)


def breaking(repo: Path) -> subprocess.CompletedProcess[str]:
    return run(str(BUF), "breaking", "--against", ".git#ref=HEAD~1,subdir=proto", cwd=repo)


def test_the_proto_passes_buf_lint() -> None:
    result = run(str(BUF), "lint", cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_renumbered_field_breaks_the_contract(scratch: Path) -> None:
    field = re.search(r"string content = (\d+);", (scratch / PROTO).read_text())
    assert field is not None
    commit_change(scratch, field.group(0), "string content = 99;")
    result = breaking(scratch)
    assert result.returncode != 0 and "content" in result.stdout, result.stdout + result.stderr


def test_a_removed_message_field_breaks_the_contract(scratch: Path) -> None:
    commit_change(scratch, "string content = ", "// string content = ")
    assert breaking(scratch).returncode != 0


def test_an_added_field_keeps_the_contract(scratch: Path) -> None:
    text = (scratch / PROTO).read_text()
    message = re.search(r"message ChatMessage \{", text)
    assert message is not None
    commit_change(scratch, "message ChatMessage {", "message ChatMessage {\n  string added_for_test = 900;")
    result = breaking(scratch)
    assert result.returncode == 0, result.stdout + result.stderr
