"""Which models a process serves, and how a conversation becomes prompt tokens.

A model is named by `NAME=DIRECTORY`; the directory is a Hugging Face model
directory (config.json, tokenizer, chat template). `NAME` alone means the bundled
default model. The gateway and the worker render prompts with the same code, so
the token counts the gateway validates are the tokens the engine runs.

A model can call tools when its chat template renders `tools` and the spec names the vLLM
tool parser that reads its calls: `NAME=DIRECTORY?tool_parser=hermes`. The bundled model
renders with common/chat_templates/smollm2.jinja (its tool format) and vLLM's xlam parser.
"""

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.model_store import DEFAULT_MODEL_NAME, bundled_model_dir

# The bundled model's template: its GGUF's own, plus the tool format SmolLM2 was tuned on.
BUNDLED_CHAT_TEMPLATE = Path(__file__).parent / "chat_templates" / "smollm2.jinja"
BUNDLED_TOOL_PARSER = "xlam"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    # vLLM's name of the parser that reads the model's tool calls; "": the model calls no tools.
    tool_parser: str = ""
    # A chat template file used instead of the directory's own; None: the directory's.
    chat_template: Path | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """`NAME=DIR[?tool_parser=PARSER]`, or `NAME` alone for the bundled default model."""
        name, sep, rest = text.strip().partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"model spec {text!r} has no name")
        if sep:
            path, _, query = rest.partition("?")
            options = dict(part.partition("=")[::2] for part in query.split("&") if part)
            unknown = set(options) - {"tool_parser"}
            if unknown:
                raise ValueError(
                    f"model spec {text!r}: unknown option {sorted(unknown)[0]!r} (known: tool_parser)"
                )
            return cls(name, Path(path.strip()).expanduser(), options.get("tool_parser", "").strip())
        if name != DEFAULT_MODEL_NAME:
            raise ValueError(f"model {name!r} needs a directory: write {name}=/path/to/model")
        return cls(name, bundled_model_dir(), BUNDLED_TOOL_PARSER, BUNDLED_CHAT_TEMPLATE)


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

# Stands in for the caller's text while the template renders (private-use characters, which no
# template writes), so that the template's output can be told apart from the caller's.
_PLACEHOLDER = "\ue000{}\ue001"
# ... and for the caller's text inside JSON the template writes (tools, tool call arguments):
# put back JSON-escaped, as `tojson` would have written it.
_JSON_PLACEHOLDER = "\ue002{}\ue003"
_PLACEHOLDERS = re.compile(r"\ue000(\d+)\ue001|\ue002(\d+)\ue003")
# The placeholders' characters: caller text that holds them is hidden too, never read as one.
_PRIVATE_USE = re.compile("[\ue000-\ue003]")


@dataclass(frozen=True)
class ToolCallRef:
    """A tool call of an earlier assistant message, as the caller sent it back."""

    id: str
    name: str
    arguments: str  # JSON text of an object (the gateway has checked it parses)


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCallRef, ...] = ()  # of an assistant message
    tool_call_id: str | None = None  # of a tool message


class PromptRenderer:
    """Turns messages into prompt token ids through the model's chat template."""

    def __init__(self, spec: ModelSpec) -> None:
        # Offline: the directory is all there is; nothing is fetched from a hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True)
        if spec.chat_template is not None:
            self.tokenizer.chat_template = spec.chat_template.read_text()
        template = self.tokenizer.chat_template or ""
        # Tools need both: a template that shows them to the model, a parser that reads its calls.
        self.supports_tools = bool(spec.tool_parser) and "tools" in template
        # Templates that know about `name` render it themselves; for the others we prefix the
        # content, so the model still sees who is speaking.
        self._template_renders_name = any(f in template for f in _NAME_FIELDS)
        # The tokens the tokenizer cuts text at (<|im_start|>, ...): in the template's text, markers.
        self._marker_ids: dict[str, int] = dict(self.tokenizer.added_tokens_encoder)
        longest_first = sorted(self._marker_ids, key=len, reverse=True)
        alternatives = "|".join(map(re.escape, longest_first)) or "(?!)"  # (?!): a tokenizer without any
        self._markers = re.compile(f"({alternatives})")
        self.context_window = read_context_window(spec.path)

    def render(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] = ()) -> list[int]:
        """Prompt token ids in which only the template's own markers are special tokens.

        The caller's text (contents, names) is tokenized as plain text: a message that contains
        `<|im_start|>system` must not open a system turn. The template renders placeholders in
        place of that text, so the markers it writes can be found; the text between two markers
        (template text with the caller's text put back) is tokenized with special tokens split,
        exactly the runs the tokenizer would have cut the whole prompt into.
        """
        texts: list[str] = []

        def hide(text: str) -> str:
            texts.append(text)
            return _PLACEHOLDER.format(len(texts) - 1)

        def hide_json(value: Any) -> Any:
            """A JSON value with the strings in it (keys too) that hold a marker hidden. Only those:
            a template may read a tool's fields by name (`tool.function.name`), and other text is
            tokenized as plain text anyway."""
            if isinstance(value, str):
                if not (self._markers.search(value) or _PRIVATE_USE.search(value)):
                    return value
                texts.append(json.dumps(value, ensure_ascii=False)[1:-1])
                return _JSON_PLACEHOLDER.format(len(texts) - 1)
            if isinstance(value, dict):
                return {hide_json(k): hide_json(v) for k, v in value.items()}
            if isinstance(value, list):
                return [hide_json(v) for v in value]
            return value

        conversation = [self._to_template_dict(m, hide, hide_json) for m in messages]
        rendered = self.tokenizer.apply_chat_template(
            conversation,
            tools=[hide_json(tool) for tool in tools] or None,
            tokenize=False,
            add_generation_prompt=True,
        )
        ids: list[int] = []
        for i, piece in enumerate(self._markers.split(rendered)):
            if i % 2 == 1:  # split() puts the captured markers at odd places
                ids.append(self._marker_ids[piece])
            elif piece:
                text = _PLACEHOLDERS.sub(lambda m: _restored(texts, m), piece)
                ids += self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids

    def _to_template_dict(
        self, message: Message, hide: Callable[[str], str], hide_json: Callable[[Any], Any]
    ) -> dict[str, Any]:
        rendered: dict[str, Any]
        if message.name is None:
            rendered = {"role": message.role, "content": hide(message.content)}
        elif self._template_renders_name:
            rendered = {"role": message.role, "content": hide(message.content), "name": hide(message.name)}
        else:
            rendered = {"role": message.role, "content": hide(f"{message.name}: {message.content}")}
        if message.tool_calls:
            # Arguments as an object, as templates (and vLLM's server) expect them.
            rendered["tool_calls"] = [
                {
                    "id": hide(call.id),
                    "type": "function",
                    "function": {"name": hide(call.name), "arguments": hide_json(json.loads(call.arguments))},
                }
                for call in message.tool_calls
            ]
        if message.tool_call_id is not None:
            rendered["tool_call_id"] = hide(message.tool_call_id)
        return rendered


def _restored(texts: list[str], placeholder: re.Match[str]) -> str:
    """The caller's text a placeholder stands for (anything else that looks like one stays)."""
    index = int(placeholder[1] or placeholder[2])
    return texts[index] if index < len(texts) else placeholder[0]


def read_context_window(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ValueError(f"{path}/config.json names no context length")
