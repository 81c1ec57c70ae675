"""The serving app's factory: what to serve comes from the environment (``DeployConfig.from_env``), or is given."""
from __future__ import annotations

from fastapi import FastAPI

from custom_net.hardware import select_device
from serve_app.model import DeployConfig, UNetModel


def create_app(config: DeployConfig | None = None) -> FastAPI:
    """Load the checkpoint and return the server (the SDK's FastAPI app with this app's routes)."""
    config = config or DeployConfig.from_env()
    model = UNetModel(config)
    model.load_on_device(model.model_dir, str(select_device(config.device)))
    model.serve()
    return model.app
