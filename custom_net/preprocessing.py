"""Image reading, resizing and normalisation shared by training, inference and serving."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


class ImageReadError(ValueError):
    """An image file could not be decoded."""


def to_rgb_uint8(image: np.ndarray, source: str = "image") -> np.ndarray:
    """Bring a decoded image of any depth and channel count to RGB uint8 (H, W, 3).

    ``image`` is in OpenCV channel order (BGR / BGRA) when it has 3 or 4 channels.
    """
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    raise ImageReadError(f"{source}: unsupported channel count {image.shape[2]}")


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8, honouring EXIF orientation as the platform does."""
    data = np.fromfile(str(path), dtype=np.uint8)
    return decode_image_rgb(data.tobytes(), source=str(path))


def image_header_size(data: bytes, source: str = "image") -> tuple[int, int] | None:
    """(height, width) from the file header, no pixels decoded; None when PIL does not know the format."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as e:  # PIL refuses headers declaring hundreds of megapixels
        raise ImageReadError(f"{source}: {e}") from None
    except Exception:
        return None
    return height, width


def image_file_size(path: str | Path) -> tuple[int, int] | None:
    """(height, width) of an image file as decoded (EXIF rotation applied), from its header alone; None when
    PIL cannot tell."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that swap the sides
                width, height = height, width
    except Exception:
        return None
    return height, width


def decode_image_rgb(data: bytes, source: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes to RGB uint8; ``max_pixels`` refuses oversized images before any pixel is decoded."""
    if len(data) == 0:
        raise ImageReadError(f"{source}: empty file")
    if max_pixels is not None:
        size = image_header_size(data, source)
        if size is not None and size[0] * size[1] > max_pixels:
            raise ImageReadError(f"{source}: image of {size[1]}x{size[0]} pixels is larger than the limit of "
                                 f"{max_pixels} pixels")
    # ANYDEPTH|ANYCOLOR keeps 16-bit and grey images but, unlike IMREAD_UNCHANGED, applies EXIF rotation.
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error as e:  # e.g. a header declaring more than OpenCV's 2^30-pixel limit
        reason = str(e).strip().splitlines()[-1].split("error: ")[-1]
        raise ImageReadError(f"{source}: not a readable image ({reason})") from None
    if image is None:
        if data[:2] == JPEG_SOI and JPEG_EOI not in data[-64:]:
            raise ImageReadError(f"{source}: truncated JPEG (the file ends before the end-of-image marker)")
        raise ImageReadError(f"{source}: not a readable image (corrupt or unsupported format)")
    return to_rgb_uint8(image, source)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    shrinking = image.shape[0] > height and image.shape[1] > width
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    if mask.shape[:2] == (height, width):
        return mask
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def normalize_batch(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (N, 3, H, W) batch, already on its device -> normalised float (N, 3, H, W)."""
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    return ((images.float() - mean) / std).to(dtype)
