"""Train dashboard entry point: ``uvicorn main:app --app-dir supervisely/train/src``.

With SERVER_ADDRESS / API_TOKEN set (a Supervisely task) it works on the platform project;
without them on the local project folder named by UNET_PROJECT_DIR (see README "Dashboard").
"""
from train_app.dashboard import Dashboard

dashboard = Dashboard.from_env()
app = dashboard.app
