"""ASGI entry point of the serving app, on the platform and locally:

    UNET_CHECKPOINT=results/exp1 uvicorn main:app --app-dir supervisely/serve/src --host 127.0.0.1 --port 8000

Configuration comes from the environment (see ``DeployConfig.from_env``): the platform passes the
modal's choices as ``modal.state.slyFile`` / ``modal.state.device``; local use sets ``UNET_CHECKPOINT``
(a run folder or a .pth) and optionally ``UNET_DEVICE``, ``UNET_RUNTIME`` (pytorch | int8 | onnx),
``UNET_AMP``, ``UNET_MAX_PIXELS``, ``UNET_MODEL_DIR``.
"""
from serve_app.app import create_app

app = create_app()
