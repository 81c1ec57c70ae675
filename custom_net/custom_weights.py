"""Starting a run from an earlier checkpoint (``--custom-weights``): this app's runs and the original app's.

Each output channel of the head belongs to one class. The channels are carried over by class name, read
from the checkpoint's own run (``<run>/info/model_classes.json``), so a checkpoint whose classes came in
another order (the original app put ``__bg__`` last) or were others keeps what each class learned.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from custom_net.original_app import read_class_titles
from custom_net.run_folder import RunFolder


class CustomWeightsError(ValueError):
    """The custom weights or their classes file cannot be used; the message names the file."""


def class_dimensions(model: nn.Module) -> dict[str, int]:
    """State-dict keys whose shape follows the class count (the head), with the dimension that does."""
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        two, three = (type(model)(num_classes=n).state_dict() for n in (2, 3))
    return {key: next(d for d, (a, b) in enumerate(zip(two[key].shape, three[key].shape)) if a != b)
            for key in two if two[key].shape != three[key].shape}


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CustomWeightsError(f"--custom-weights: {path} not found") from None
    except Exception as e:  # torch's unpickling message advises weights_only=False: wrong for a bad file
        reason = "" if isinstance(e, pickle.UnpicklingError) else f" ({e})"
        raise CustomWeightsError(f"--custom-weights: {path} is not a PyTorch state dict{reason}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CustomWeightsError(f"--custom-weights: {path} is not a PyTorch state dict (a dict of tensors)")
    return state


def checkpoint_classes(path: str, classes_file: str | None) -> tuple[list[str] | None, str | None]:
    """(class names in the checkpoint's head order, the file they came from); (None, None) when unknown."""
    source = Path(classes_file) if classes_file else RunFolder.of_checkpoint(path).model_classes
    if not classes_file and not source.is_file():
        return None, None
    try:
        return read_class_titles(source, "--custom-weights-classes"), str(source)
    except ValueError as e:
        raise CustomWeightsError(str(e)) from None


def load_custom_weights(model: nn.Module, path: str, class_names: list[str], report,
                        classes_file: str | None = None) -> None:
    """Load ``path`` into ``model``, whose head predicts ``class_names``; every choice made about the head
    is reported (``report(level, text)``)."""
    state = read_state_dict(path)
    own = model.state_dict()  # shares storage with the model's tensors
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CustomWeightsError(f"--custom-weights: {path} does not fit this architecture "
                                 f"(unexpected keys such as {unexpected[0]})")
    head = class_dimensions(model)
    misfit = [k for k in state if k not in head and state[k].shape != own[k].shape]
    if misfit:
        raise CustomWeightsError(f"--custom-weights: {path} does not fit this architecture ({misfit[0]} has shape "
                                 f"{tuple(state[misfit[0]].shape)}, not {tuple(own[misfit[0]].shape)})")
    model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    source, source_file = checkpoint_classes(path, classes_file)
    head_classes = {state[k].shape[d] for k, d in head.items() if k in state}
    if source is not None and head_classes != {len(source)}:
        raise CustomWeightsError(f"--custom-weights: {source_file} lists {len(source)} classes, but the head of "
                                 f"{path} predicts {', '.join(map(str, sorted(head_classes)))}")
    if source is None:
        if head_classes == {len(class_names)}:
            model.load_state_dict({k: state[k] for k in head if k in state}, strict=False)
            report("warning", f"--custom-weights: no model_classes.json beside {path}: its head is taken as is, "
                              f"in this run's class order ({', '.join(class_names)}); name its classes with "
                              "--custom-weights-classes if they came in another order")
        else:
            report("warning", f"--custom-weights: its head predicts {', '.join(map(str, sorted(head_classes)))} classes "
                              f"and no model_classes.json says which: the head starts untrained")
        return
    kept = [(i, source.index(name)) for i, name in enumerate(class_names) if name in source]
    if not kept:
        report("warning", f"--custom-weights: none of its classes ({', '.join(source)}, from {source_file}) is a class "
                          f"of this run ({', '.join(class_names)}): the head starts untrained")
        return
    with torch.no_grad():
        for key, dim in head.items():
            if key in state:
                for ours, theirs in kept:
                    own[key].select(dim, ours).copy_(state[key].select(dim, theirs))
    new = [name for name in class_names if name not in source]
    report("info", f"--custom-weights: the head keeps the weights of {', '.join(class_names[i] for i, _ in kept)}"
                   + (f"; new, untrained: {', '.join(new)}" if new else "") + f" (classes from {source_file})")
