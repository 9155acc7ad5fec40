"""FastAPI dependencies: the app's settings and model registry, typed for handlers. Async, so that
FastAPI calls them on the event loop instead of hopping to a worker thread for each."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.registry import ModelRegistry
from service.settings import Settings


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


SettingsDep = Annotated[Settings, Depends(_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(_registry)]
