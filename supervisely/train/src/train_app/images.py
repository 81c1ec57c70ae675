"""Pictures for widgets: RGB arrays as PNG data URLs (no file server needed, works in any mode)."""
from __future__ import annotations

import base64

import cv2
import numpy as np


def data_url(image_rgb: np.ndarray) -> str:
    ok, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("cannot encode the image as PNG")
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode()


def fit(image: np.ndarray, max_side: int) -> tuple[int, int]:
    """(height, width) that fit ``max_side`` keeping the aspect ratio."""
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))
