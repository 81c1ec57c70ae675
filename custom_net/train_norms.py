"""BatchNorm while training, folded away when saved.

UNet, UNet11 and UNet16 have no BatchNorm, as in the original app, nor have LinkNet34's last two conv layers,
and from scratch they learn slowly in a small budget (bench/RESULTS.md). ``add_training_norms`` puts a
BatchNorm after every conv layer whose output no BatchNorm of the model's own takes, but the head, as a
forward hook, so the architecture's modules and names stay as they are. In eval mode a BatchNorm is a
per-channel affine map, which ``deployable_state_dict`` folds into its conv's weights and bias: checkpoints
hold the plain architecture, load in the original app and give the outputs validation saw (to float
rounding).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from custom_net.model import conv_batchnorm_pairs, folded_weights

ATTRIBUTE = "training_norms"  # the model's ModuleList of norms; its keys are dropped from checkpoints
CONV_NAMES = "training_norm_convs"  # the names of the convs they follow, in the same order
CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def _convs_to_normalise(model: nn.Module) -> list[str]:
    """Names of the conv layers whose output no BatchNorm of the model's own takes (found by tracing one
    forward pass), in the model's module order; not the last conv, the head: its logits stay free."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, CONVS)][:-1]
    was_training = model.training
    try:
        model.eval()  # running statistics stay untouched
        pairs, _ = conv_batchnorm_pairs(model, torch.zeros(1, 3, 64, 64, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    normalised = {conv for conv, _ in pairs}
    return [name for name, conv in convs if conv not in normalised]


def _normalise(norms: nn.ModuleList, index: int, module, args, output):
    # Looked up at call time, so a SyncBatchNorm swapped into the list (torchrun --sync-bn) is the one used.
    return norms[index](output)


def add_training_norms(model: nn.Module) -> nn.Module:
    """Attach a BatchNorm after every conv layer without one but the head (in place); returns the model."""
    if has_training_norms(model):
        raise ValueError("the model already has training norms")
    names = _convs_to_normalise(model)
    convs = [model.get_submodule(name) for name in names]
    if any(conv.bias is None for conv in convs):
        raise ValueError("training norms fold into conv biases; a conv layer here has none")
    norms = nn.ModuleList(nn.BatchNorm2d(conv.out_channels) for conv in convs)
    setattr(model, ATTRIBUTE, norms)
    setattr(model, CONV_NAMES, names)
    for index, conv in enumerate(convs):
        conv.register_forward_hook(functools.partial(_normalise, norms, index))
    return model


def has_training_norms(model: nn.Module) -> bool:
    return isinstance(getattr(model, ATTRIBUTE, None), nn.ModuleList)


@torch.no_grad()
def deployable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as the plain architecture: each norm's eval-mode affine map folded into its
    conv. A model without training norms gives its own state dict."""
    state = model.state_dict()
    if not has_training_norms(model):
        return state
    prefix = ATTRIBUTE + "."
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    names: dict[int, list[str]] = {}  # a conv registered twice (VGG's encoder.N and convM.K) has two names
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    convs = [model.get_submodule(name) for name in getattr(model, CONV_NAMES)]
    for conv, norm in zip(convs, getattr(model, ATTRIBUTE)):
        weight, bias = folded_weights(conv, norm)
        for name in names[id(conv)]:
            state[f"{name}.weight"], state[f"{name}.bias"] = weight, bias
    return state
