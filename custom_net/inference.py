"""Prediction on whole images and conversion to Supervisely annotations."""
from __future__ import annotations

import numpy as np
import supervisely as sly
import torch
import torch.nn.functional as F

from custom_net.preprocessing import normalize_batch, resize_image


@torch.inference_mode()
def predict_probabilities(model, images: np.ndarray | torch.Tensor, device, amp_dtype=None) -> torch.Tensor:
    """Softmax probabilities (N, C, H, W) float32 for a uint8 batch (N, H, W, 3) at the model's input size."""
    model.eval()
    batch = torch.as_tensor(images).to(device, non_blocking=True)
    inputs = normalize_batch(batch)
    if device.type == "cpu" or amp_dtype is not None:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(inputs)
    return logits.float().softmax(dim=1)


@torch.inference_mode()
def inference(model, image: np.ndarray, input_height: int, input_width: int, device=torch.device("cpu"),
              amp_dtype=None) -> np.ndarray:
    """Class-index mask (H, W) uint8 for an RGB image of any size.

    The image is resized to the training size, as in training; probabilities are resized
    back bilinearly before the argmax, which gives smoother edges than resizing indices.
    """
    height, width = image.shape[:2]
    resized = resize_image(image, input_height, input_width)
    probs = predict_probabilities(model, resized[None], device, amp_dtype)
    probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
    return probs.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()


def convert_prediction_to_sly_format(mask: np.ndarray, model_classes: list[sly.ObjClass],
                                     skip_background: bool = True) -> sly.Annotation:
    """One Bitmap label per predicted class; ``__bg__`` is left out unless asked for.

    Predicted classes are bitmaps whatever shape the class was labelled with (polygon,
    rectangle...), so each class is re-declared with the Bitmap geometry.
    """
    labels = []
    for index in np.unique(mask).tolist():
        obj_class = model_classes[index]
        if skip_background and obj_class.name == "__bg__":
            continue
        if obj_class.geometry_type is not sly.Bitmap:
            obj_class = obj_class.clone(geometry_type=sly.Bitmap)
        labels.append(sly.Label(sly.Bitmap(mask == index), obj_class))
    return sly.Annotation(img_size=mask.shape[:2], labels=labels)
