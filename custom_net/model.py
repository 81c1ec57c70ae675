"""Segmentation networks with the layer layout of the original Supervisely UNet app.

Module names and nesting are part of the checkpoint format: a state dict saved by the
original app must load strictly, so the attribute names below are not free to change
(see ../shared/reference/original_state_dicts.json). The VGG and ResNet models register
encoder layers twice (under ``encoder.*`` and under ``convN``), as the original did.

Every model returns raw per-class logits of shape (N, num_classes, H, W); losses and
inference apply (log-)softmax themselves. Inputs of any size work: where a decoder
output and its skip connection disagree by a pixel (sizes not divisible by 32), the
decoder output is resized to the skip's size.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from custom_net.pretrained import load_imagenet_weights


def _match(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Resize x to ref's spatial size when they differ (odd input sizes)."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="nearest")


torch.fx.wrap("_match")  # a leaf when FX traces the models (int8 quantization): its shape test is not traceable


class ConvRelu(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activation(self.conv(x))


class DeconvDecoderBlock(nn.Module):
    """Conv + transposed conv that doubles the resolution (TernausNet style)."""

    def __init__(self, in_channels: int, middle_channels: int, out_channels: int):
        super().__init__()
        self.block = nn.Sequential(
            ConvRelu(in_channels, middle_channels),
            nn.ConvTranspose2d(middle_channels, out_channels, kernel_size=4, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.block(x)


class UpsampleDecoderBlock(nn.Module):
    """Bilinear x2 upsampling followed by two conv layers (AlbuNet decoder)."""

    def __init__(self, in_channels: int, middle_channels: int, out_channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            ConvRelu(in_channels, middle_channels),
            ConvRelu(middle_channels, out_channels),
        )

    def forward(self, x):
        return self.block(x)


class UNetStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.l1 = ConvRelu(in_channels, out_channels)
        self.l2 = ConvRelu(out_channels, out_channels)

    def forward(self, x):
        return self.l2(self.l1(x))


class UNet(nn.Module):
    """Classic UNet trained from scratch: five stages of 32..512 filters, 4x4 pooling at the bottom."""

    def __init__(self, num_classes: int, encoder_weights=None, in_channels: int = 3, base: int = 32):
        super().__init__()
        if encoder_weights:
            raise ValueError("UNet has no pretrained encoder; train it from scratch (--encoder-weights none)")
        widths = [base * f for f in (1, 2, 4, 8, 16)]
        self.down = nn.ModuleList([UNetStage(in_channels, widths[0])])
        self.down.extend(UNetStage(w_in, w_out) for w_in, w_out in zip(widths, widths[1:]))
        self.up = nn.ModuleList(UNetStage(w + w_next, w) for w, w_next in zip(widths, widths[1:]))
        self.pool_factors = [2, 2, 2, 4]  # downsampling before down[1..4]; the original pooled 4x at the bottom
        self.conv_final = nn.Conv2d(widths[0], num_classes, 1)

    def encoder_modules(self) -> list[nn.Module]:
        return []

    def forward(self, x):
        skips = [self.down[0](x)]
        for factor, stage in zip(self.pool_factors, self.down[1:]):
            skips.append(stage(F.max_pool2d(skips[-1], factor)))
        out = skips.pop()
        for factor, skip, stage in reversed(list(zip(self.pool_factors, skips, self.up))):
            out = _match(F.interpolate(out, scale_factor=factor, mode="nearest"), skip)
            out = stage(torch.cat([out, skip], 1))
        return self.conv_final(out)


class _VGGUNet(nn.Module):
    """UNet with a VGG encoder (TernausNet). ``stages`` lists the VGG feature indices of each conv stage."""

    vgg_name = ""
    vgg_config = ""  # torchvision's layer configuration letter of that VGG
    stages: tuple = ()
    decoder_widths: tuple = ()

    def __init__(self, num_classes: int, encoder_weights=None, base: int = 32):
        super().__init__()
        # Only the conv features: building the whole VGG would initialise a 100M-parameter classifier.
        self.encoder = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs[self.vgg_config])
        init_untrained_layers(self.encoder, set(), "fan_out")  # as torchvision's VGG (so the original app) did
        if encoder_weights:
            load_imagenet_weights(self.encoder, self.vgg_name,
                                  None if encoder_weights == "imagenet" else encoder_weights, prefix="features.")
        self.relu = nn.ReLU(inplace=True)
        for i, indices in enumerate(self.stages, start=1):
            layers = []
            for idx in indices:
                layers += [self.encoder[idx], self.relu]
            setattr(self, f"conv{i}", nn.Sequential(*layers))
        (c_in, m, c), *rest = self.decoder_widths
        self.center = DeconvDecoderBlock(c_in, m, c)
        for name, (c_in, m, c) in zip(("dec5", "dec4", "dec3", "dec2"), rest):
            setattr(self, name, DeconvDecoderBlock(c_in, m, c))
        self.dec1 = ConvRelu(base * 3, base)
        self.final = nn.Conv2d(base, num_classes, kernel_size=1)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def forward(self, x):
        conv1 = self.conv1(x)
        conv2 = self.conv2(F.max_pool2d(conv1, 2))
        conv3 = self.conv3(F.max_pool2d(conv2, 2))
        conv4 = self.conv4(F.max_pool2d(conv3, 2))
        conv5 = self.conv5(F.max_pool2d(conv4, 2))
        out = self.center(F.max_pool2d(conv5, 2))
        for dec, skip in ((self.dec5, conv5), (self.dec4, conv4), (self.dec3, conv3), (self.dec2, conv2)):
            out = dec(torch.cat([_match(out, skip), skip], 1))
        out = self.dec1(torch.cat([_match(out, conv1), conv1], 1))
        return self.final(out)


class UNet11(_VGGUNet):
    """TernausNet UNet with a VGG11 encoder."""

    vgg_name = "vgg11"
    vgg_config = "A"
    stages = ((0,), (3,), (6, 8), (11, 13), (16, 18))
    decoder_widths = ((512, 512, 256), (768, 512, 256), (768, 512, 128), (384, 256, 64), (192, 128, 32))


class UNet16(_VGGUNet):
    """TernausNet UNet with a VGG16 encoder."""

    vgg_name = "vgg16"
    vgg_config = "D"
    stages = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
    decoder_widths = ((512, 512, 256), (768, 512, 256), (768, 512, 256), (512, 256, 64), (192, 128, 32))


def _resnet34(encoder_weights) -> torchvision.models.ResNet:
    resnet = torchvision.models.resnet34(weights=None)
    if encoder_weights:
        load_imagenet_weights(resnet, "resnet34", None if encoder_weights == "imagenet" else encoder_weights)
    return resnet


class AlbuNet(nn.Module):
    """UNet with a ResNet34 encoder and bilinear-upsampling decoder (Albu's TernausNet variant)."""

    def __init__(self, num_classes: int, encoder_weights=None, base: int = 32):
        super().__init__()
        self.encoder = _resnet34(encoder_weights)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv1 = nn.Sequential(self.encoder.conv1, self.encoder.bn1, self.encoder.relu, self.pool)
        self.conv2 = self.encoder.layer1
        self.conv3 = self.encoder.layer2
        self.conv4 = self.encoder.layer3
        self.conv5 = self.encoder.layer4
        self.center = UpsampleDecoderBlock(512, base * 16, base * 8)
        self.dec5 = UpsampleDecoderBlock(512 + base * 8, base * 16, base * 8)
        self.dec4 = UpsampleDecoderBlock(256 + base * 8, base * 16, base * 8)
        self.dec3 = UpsampleDecoderBlock(128 + base * 8, base * 8, base * 2)
        self.dec2 = UpsampleDecoderBlock(64 + base * 2, base * 4, base * 4)
        self.dec1 = UpsampleDecoderBlock(base * 4, base * 4, base)
        self.dec0 = ConvRelu(base, base)
        self.final = nn.Conv2d(base, num_classes, kernel_size=1)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def forward(self, x):
        conv1 = self.conv1(x)
        conv2 = self.conv2(conv1)
        conv3 = self.conv3(conv2)
        conv4 = self.conv4(conv3)
        conv5 = self.conv5(conv4)
        out = self.center(self.pool(conv5))
        for dec, skip in ((self.dec5, conv5), (self.dec4, conv4), (self.dec3, conv3), (self.dec2, conv2)):
            out = dec(torch.cat([_match(out, skip), skip], 1))
        out = self.dec0(_match(self.dec1(out), x))
        return self.final(out)


def _bf16_on_cpu(x: torch.Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu") and
                                         torch.get_autocast_dtype("cpu") == torch.bfloat16)


class EvenOutputConvTranspose2d(nn.ConvTranspose2d):
    """A ConvTranspose2d (same parameters, same result) that, in bfloat16 on the CPU, zero-pads its
    kernel so that the output before cropping is a multiple of the stride: oneDNN's bfloat16 kernel is
    several times slower otherwise (kernel 3, stride 2, no padding: 27 against 3.6 ms at 128² → 257²).
    Extra kernel taps at the end only add output rows and columns after the true ones, which are cut off."""

    def forward(self, x, output_size=None):
        extra = [(-(k + op - 2 * p)) % s for k, op, p, s in
                 zip(self.kernel_size, self.output_padding, self.padding, self.stride)]
        if output_size is not None or not any(extra) or self.dilation != (1, 1) or not _bf16_on_cpu(x):
            return super().forward(x, output_size)
        weight = F.pad(self.weight, (0, extra[1], 0, extra[0]))
        out = F.conv_transpose2d(x, weight, self.bias, self.stride, self.padding, self.output_padding,
                                 self.groups, self.dilation)
        return out[..., : out.shape[-2] - extra[0], : out.shape[-1] - extra[1]]


class LinkNetDecoderBlock(nn.Module):
    """1x1 squeeze, x2 transposed conv, 1x1 expand, each with BatchNorm + ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = in_channels // 4
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, mid, 1)
        self.norm1 = nn.BatchNorm2d(mid)
        self.deconv2 = nn.ConvTranspose2d(mid, mid, kernel_size=4, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1)
        self.norm3 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = self.relu(self.norm1(self.conv1(x)))
        x = self.relu(self.norm2(self.deconv2(x)))
        return self.relu(self.norm3(self.conv3(x)))


class LinkNet34(nn.Module):
    """LinkNet with a ResNet34 encoder: decoder outputs are added to (not concatenated with) the skips."""

    def __init__(self, num_classes: int, encoder_weights=None):
        super().__init__()
        resnet = _resnet34(encoder_weights)
        self.firstconv = resnet.conv1
        self.firstbn = resnet.bn1
        self.firstrelu = resnet.relu
        self.firstmaxpool = resnet.maxpool
        self.encoder1 = resnet.layer1
        self.encoder2 = resnet.layer2
        self.encoder3 = resnet.layer3
        self.encoder4 = resnet.layer4
        self.decoder4 = LinkNetDecoderBlock(512, 256)
        self.decoder3 = LinkNetDecoderBlock(256, 128)
        self.decoder2 = LinkNetDecoderBlock(128, 64)
        self.decoder1 = LinkNetDecoderBlock(64, 64)
        self.finaldeconv1 = EvenOutputConvTranspose2d(64, 32, 3, stride=2)
        self.finalrelu1 = nn.ReLU(inplace=True)
        self.finalconv2 = nn.Conv2d(32, 32, 3)
        self.finalrelu2 = nn.ReLU(inplace=True)
        self.finalconv3 = nn.Conv2d(32, num_classes, 2, padding=1)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.firstconv, self.firstbn, self.encoder1, self.encoder2, self.encoder3, self.encoder4]

    def forward(self, x):
        stem = self.firstmaxpool(self.firstrelu(self.firstbn(self.firstconv(x))))
        e1 = self.encoder1(stem)
        e2 = self.encoder2(e1)
        e3 = self.encoder3(e2)
        e4 = self.encoder4(e3)
        d = _match(self.decoder4(e4), e3) + e3
        d = _match(self.decoder3(d), e2) + e2
        d = _match(self.decoder2(d), e1) + e1
        d = self.decoder1(d)
        out = self.finalrelu2(self.finalconv2(self.finalrelu1(self.finaldeconv1(d))))
        return _match(self.finalconv3(out), x)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, sample_size: int = 64) -> nn.Module:
    """For inference: an eval-mode copy of ``model`` in which every BatchNorm that directly follows a
    convolution is merged into that convolution's weights and replaced by Identity. The same function,
    minus one memory-bound pass per BatchNorm. Pairs are found by tracing one forward pass; the copy is
    checked against the original on that input, and ``model`` itself is returned if they disagree.
    Its state dict has another layout: save checkpoints from the training model, never from this."""
    model = model.eval()
    folded = copy.deepcopy(model)
    device = next(model.parameters()).device
    sample = torch.randn(1, 3, sample_size, sample_size, generator=torch.Generator().manual_seed(0)).to(device)
    traced, expected = conv_batchnorm_pairs(folded, sample)
    pairs = [(conv if conv is not None and conv.groups == 1 else None, bn) for conv, bn in traced
             if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats]
    if not pairs:
        return model
    convs = [conv for conv, _ in pairs if conv is not None]
    bns = [bn for _, bn in pairs]
    for conv, bn in pairs:
        # A module run twice in one pass (shared weights) cannot be folded for one of its uses only.
        if conv is None or convs.count(conv) > 1 or bns.count(bn) > 1:
            continue
        _merge(conv, bn)
        for parent in folded.modules():  # the ResNet models register encoder layers under two names
            for name, child in list(parent.named_children()):
                if child is bn:
                    setattr(parent, name, nn.Identity())
    if not torch.allclose(folded(sample), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item()):
        return model
    return folded


@torch.no_grad()
def conv_batchnorm_pairs(model: nn.Module, sample: torch.Tensor
                         ) -> tuple[list[tuple[nn.Module | None, nn.Module]], torch.Tensor]:
    """Runs ``model`` on ``sample``: (for each BatchNorm call in order, the conv layer whose output it took,
    or None where its input came from elsewhere; the model's output)."""
    produced, pairs, hooks = {}, [], []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            # Each output is kept alive, so that no later tensor takes its id.
            hooks.append(module.register_forward_hook(lambda m, i, o: produced.__setitem__(id(o), (o, m))))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            hooks.append(module.register_forward_hook(
                lambda m, i, o: pairs.append((produced.get(id(i[0]), (None, None))[1], m))))
    try:
        output = model(sample)
    finally:
        for hook in hooks:
            hook.remove()
    return pairs, output


def folded_weights(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one convolution computing ``conv`` followed by ``bn`` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
    out_dim = 1 if isinstance(conv, nn.ConvTranspose2d) else 0  # ConvTranspose2d weights are (in, out, kh, kw)
    shape = [1] * conv.weight.dim()
    shape[out_dim] = -1
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    return conv.weight * scale.view(shape), bias * scale + shift


def _merge(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    weight, bias = folded_weights(conv, bn)
    conv.weight.copy_(weight)
    conv.bias = nn.Parameter(bias)


# The architecture registry: the CLI choices, the dashboard's model table and the tests all read it.
# A new architecture = a class in model.py taking (num_classes, encoder_weights) + one entry here.
# The engine's default recipe per architecture, chosen by bench/quality.py: "lr" is the peak learning
# rate; "decoder_lr_factor" scales it for the layers outside encoder_modules(). AlbuNet's
# BatchNorm-free decoder on a ResNet encoder diverges at the 3e-3 its encoder learns best with.
# "lsuv": whether --init lsuv scales the model on training images (scale_to_data); bench/RESULTS.md: it lifted
# UNet11 and UNet and cost UNet16 on the nuclei (without --train-batchnorm, which makes it moot).
# "train_batchnorm": --train-batchnorm may add a BatchNorm after the conv layers without one (custom_net.train_norms):
# all of UNet's, UNet11's and UNet16's, LinkNet34's last two. AlbuNet's decoder with them was not better.
model_list = {
    "UNet": {"class": UNet, "description": "Classic UNet, trained from scratch", "pretrained_encoder": None,
             "lr": 3e-3, "decoder_lr_factor": 1.0, "lsuv": True, "train_batchnorm": True},
    "UNet11": {"class": UNet11, "description": "UNet with a VGG11 encoder (TernausNet)", "pretrained_encoder": "vgg11",
               "lr": 3e-3, "decoder_lr_factor": 1.0, "lsuv": True, "train_batchnorm": True},
    "UNet16": {"class": UNet16, "description": "UNet with a VGG16 encoder (TernausNet)", "pretrained_encoder": "vgg16",
               "lr": 3e-3, "decoder_lr_factor": 1.0, "lsuv": False, "train_batchnorm": True},
    "AlbuNet": {"class": AlbuNet, "description": "UNet with a ResNet34 encoder", "pretrained_encoder": "resnet34",
                "lr": 3e-3, "decoder_lr_factor": 0.33, "lsuv": False, "train_batchnorm": False},
    "LinkNet34": {"class": LinkNet34, "description": "LinkNet with a ResNet34 encoder", "pretrained_encoder": "resnet34",
                  "lr": 3e-3, "decoder_lr_factor": 1.0, "lsuv": False, "train_batchnorm": True},
}


class UnknownModelError(ValueError):
    """A model name outside ``model_list`` or weights it cannot take; the message lists the choices."""


INIT_SCHEMES = ("lsuv", "he", "original")


def build_model(name: str, num_classes: int, encoder_weights: str | None = None, init: str = "he") -> nn.Module:
    """``init``: 'he' = He initialisation for every layer not loaded from ImageNet; 'lsuv' = the same here,
    then, where model_list says so, ``scale_to_data`` once the training data is at hand (the trainer calls
    it); 'original' = each layer's own default, as the original app built them."""
    if name not in model_list:
        raise UnknownModelError(f"unknown model {name!r}; choose from {', '.join(model_list)}")
    weights = None if encoder_weights in (None, "", "none") else encoder_weights
    if weights and not model_list[name]["pretrained_encoder"]:
        raise UnknownModelError(f"--encoder-weights: {name} has no pretrained encoder; use --encoder-weights none")
    model = model_list[name]["class"](num_classes=num_classes, encoder_weights=weights)
    if init not in INIT_SCHEMES:
        raise UnknownModelError(f"unknown init {init!r}; choose from {', '.join(INIT_SCHEMES)}")
    if init in ("he", "lsuv"):
        init_untrained_layers(model, encoder_parameters(model) if weights else set())
    return model


def encoder_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters a pretrained encoder loads."""
    return {id(p) for m in model.encoder_modules() for p in m.parameters()}


def init_untrained_layers(model: nn.Module, keep: set[int], mode: str = "fan_in") -> None:
    """He (Kaiming) initialisation for every conv layer whose weights are not in ``keep``.

    PyTorch's default conv init scales weights for variance 1/(3 fan_in): through the
    BatchNorm-free ReLU layers of these decoders (and of a VGG encoder) the signal fades, and
    from scratch the models sit on a single class for many epochs. He init with fan_in keeps the
    forward variance per layer, also where a decoder narrows the channels.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and id(module.weight) not in keep:
            nn.init.kaiming_normal_(module.weight, mode=mode, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


LSUV_IMAGES = 4  # --init lsuv's sample: a forward pass without gradients, less memory than a training step


@torch.no_grad()
def scale_to_data(model: nn.Module, inputs: torch.Tensor, keep: set[int]) -> bool:
    """Layer-sequential unit-variance scaling (LSUV), for architectures without BatchNorm: in one forward
    pass over ``inputs`` (a normalised training batch), every conv layer whose weights are not in ``keep``
    is scaled so that its output has unit standard deviation, and hands that scaled output on, so each
    later layer is scaled for the inputs it will see. He init keeps the variance only in expectation: on
    real images these networks' layer outputs range from 0.7 to 2.6 times the input's deviation, with no
    BatchNorm to undo it (bench/RESULTS.md has what the scaling gains). Models with BatchNorm are left as
    they are: it normalises their layers. Returns whether the model was scaled."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    scaled = set()

    def rescale(module, args, output):
        if module in scaled:  # a layer run twice in one pass is scaled for its first use
            return output
        scaled.add(module)
        factor = 1 / output.float().std().clamp_min(1e-6)
        module.weight.mul_(factor.to(module.weight.dtype))
        if module.bias is not None:
            module.bias.mul_(factor.to(module.bias.dtype))
        return output * factor.to(output.dtype)

    hooks = [m.register_forward_hook(rescale) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and id(m.weight) not in keep]
    try:
        model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return True
