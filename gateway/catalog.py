"""The models this gateway serves, with what validation needs to know about each.

A model's context window starts as the model's own (config.json) and follows what its
live workers' engines report (common/engine_registry.py), which may be shorter.
"""

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.models import Message, ModelSpec, PromptRenderer


@dataclass(frozen=True)
class ServedModel:
    name: str
    renderer: PromptRenderer
    context_window: int  # what the workers' engines run with, else the model's own
    created: int  # unix seconds when this gateway loaded it
    model_context_window: int = 0  # the model's own (config.json)

    def render(self, messages: list[Message], tools: Sequence[dict[str, Any]] = ()) -> list[int]:
        return self.renderer.render(messages, tools)

    @property
    def supports_tools(self) -> bool:
        return self.renderer.supports_tools


class ModelCatalog:
    def __init__(self, models: list[ServedModel], aliases: Mapping[str, str] | None = None) -> None:
        self._models = {m.name: m for m in models}
        self._aliases = dict(aliases or {})  # GATEWAY_MODEL_ALIASES: alias -> served name

    @classmethod
    def load(cls, specs: tuple[ModelSpec, ...], aliases: Mapping[str, str] | None = None) -> "ModelCatalog":
        served = []
        for spec in specs:
            renderer = PromptRenderer(spec)
            window = renderer.context_window
            served.append(ServedModel(spec.name, renderer, window, int(time.time()), window))
        return cls(served, aliases)

    def set_engine_context_window(self, name: str, window: int | None) -> None:
        """What the model's live workers run with; None (no live worker) falls back to the model's own."""
        model = self._models[name]
        window = window or model.model_context_window
        if window != model.context_window:
            self._models[name] = dataclasses.replace(model, context_window=window)

    def resolve(self, name: str) -> str:
        """The served model's name for a name or alias (unknown names are returned as they are)."""
        return self._aliases.get(name, name)

    def get(self, name: str) -> ServedModel | None:
        """The served model a name or alias names."""
        return self._models.get(self.resolve(name))

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._models.values())

    @property
    def names(self) -> list[str]:
        return list(self._models)
