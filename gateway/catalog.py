"""The models this gateway serves, with what validation needs to know about each."""

import time
from dataclasses import dataclass

from common.models import Message, ModelSpec, PromptRenderer


@dataclass(frozen=True)
class ServedModel:
    name: str
    renderer: PromptRenderer
    context_window: int
    created: int  # unix seconds when this gateway loaded it

    def render(self, messages: list[Message]) -> list[int]:
        return self.renderer.render(messages)


class ModelCatalog:
    def __init__(self, models: list[ServedModel]) -> None:
        self._models = {m.name: m for m in models}

    @classmethod
    def load(cls, specs: tuple[ModelSpec, ...]) -> "ModelCatalog":
        served = []
        for spec in specs:
            renderer = PromptRenderer(spec)
            served.append(ServedModel(spec.name, renderer, renderer.context_window, int(time.time())))
        return cls(served)

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._models.values())

    @property
    def names(self) -> list[str]:
        return list(self._models)
