"""Which models a process serves, and how a conversation becomes prompt tokens.

A model is named by `NAME=DIRECTORY`; the directory is a Hugging Face model
directory (config.json, tokenizer, chat template). `NAME` alone means the bundled
default model. The gateway and the worker render prompts with the same code, so
the token counts the gateway validates are the tokens the engine runs.
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.model_store import DEFAULT_MODEL_NAME, bundled_model_dir


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """`NAME=DIR`, or `NAME` alone for the bundled default model."""
        name, sep, path = text.strip().partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"model spec {text!r} has no name")
        if sep:
            return cls(name, Path(path.strip()).expanduser())
        if name != DEFAULT_MODEL_NAME:
            raise ValueError(f"model {name!r} needs a directory: write {name}=/path/to/model")
        return cls(name, bundled_model_dir())


def parse_model_specs(text: str) -> tuple[ModelSpec, ...]:
    specs = tuple(ModelSpec.parse(part) for part in text.split(",") if part.strip())
    if not specs:
        raise ValueError("no model configured")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    return specs


# How chat templates read a message's name, when they do.
_NAME_FIELDS = ("message.name", "message['name']", 'message["name"]')


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str | None = None


class PromptRenderer:
    """Turns messages into prompt token ids through the model's chat template."""

    def __init__(self, spec: ModelSpec) -> None:
        # Offline: the directory is all there is; nothing is fetched from a hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True)
        template = self.tokenizer.chat_template or ""
        # Templates that know about `name` render it themselves; for the others we prefix the
        # content, so the model still sees who is speaking.
        self._template_renders_name = any(f in template for f in _NAME_FIELDS)
        self.context_window = read_context_window(spec.path)

    def render(self, messages: Sequence[Message]) -> list[int]:
        conversation = [self._to_template_dict(m) for m in messages]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def _to_template_dict(self, message: Message) -> dict[str, Any]:
        if message.name is None:
            return {"role": message.role, "content": message.content}
        if self._template_renders_name:
            return {"role": message.role, "content": message.content, "name": message.name}
        return {"role": message.role, "content": f"{message.name}: {message.content}"}


def read_context_window(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ValueError(f"{path}/config.json names no context length")
