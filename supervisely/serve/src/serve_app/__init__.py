"""The serving app (Supervisely "Serve UNet"): ``create_app()`` in ``serve_app.app``."""
