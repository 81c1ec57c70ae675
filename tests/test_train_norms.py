"""--train-batchnorm: BatchNorm while training, folded into the plain architecture's convs when saved."""
from __future__ import annotations

import copy

import pytest
import torch

from custom_net.config import ArgsError, parse_config
from custom_net.model import build_model, model_list
from custom_net.train_norms import ATTRIBUTE, add_training_norms, deployable_state_dict
from custom_net.trainer import resolve_train_batchnorm

NORMALISED = [name for name, spec in model_list.items() if spec["train_batchnorm"]]
# The conv layers whose output no BatchNorm of the architecture takes, where it has some (the head excluded).
WITHOUT_OWN_NORM = {"LinkNet34": ["finaldeconv1", "finalconv2"]}


def _trained_a_little(name: str) -> torch.nn.Module:
    """A model with norms whose running statistics and affine weights are far from their initial values."""
    torch.manual_seed(0)
    model = add_training_norms(build_model(name, num_classes=3, init="he"))
    with torch.no_grad():
        for _ in range(3):  # running statistics of real activations, not (0, 1)
            model(torch.randn(2, 3, 64, 96) * 2 + 0.5)
        for norm in getattr(model, ATTRIBUTE):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("name", NORMALISED)
def test_saved_weights_are_the_plain_architecture_computing_what_validation_saw(name):
    model = _trained_a_little(name)
    plain = build_model(name, num_classes=3)
    state = deployable_state_dict(model)
    assert list(state) == list(plain.state_dict())  # the original app's layout, in its order
    plain.load_state_dict(state, strict=True)
    plain.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        expected, got = model(x), plain(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    # Every conv without a BatchNorm of its own is normalised, but the head: its logits stay free.
    convs = [name for name, m in plain.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    expected = WITHOUT_OWN_NORM.get(name, convs[:-1])
    assert model.training_norm_convs == expected
    assert len(getattr(model, ATTRIBUTE)) == len(expected)
    assert convs[-1] in ("final", "conv_final", "finalconv3") and convs[-1] not in expected


def test_finding_the_convs_leaves_the_model_as_it_was():
    model = build_model("LinkNet34", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_training_norms(model)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # its own BatchNorms' statistics too


def test_a_conv_registered_twice_is_folded_under_both_names():
    state = deployable_state_dict(_trained_a_little("UNet11"))
    assert torch.equal(state["encoder.0.weight"], state["conv1.0.weight"])
    assert not torch.equal(state["encoder.0.weight"], _trained_a_little("UNet11").encoder[0].weight)


def test_a_copy_uses_its_own_norms_and_a_swapped_norm_is_the_one_run():
    model = _trained_a_little("UNet")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        before = model(x)
        twin = copy.deepcopy(model)
        getattr(twin, ATTRIBUTE)[0].running_mean.add_(5)
        assert torch.equal(model(x), before)  # the copy's change stays in the copy
        assert not torch.allclose(twin(x), before)
        # torchrun --sync-bn replaces each BatchNorm in place with a SyncBatchNorm: that one must run.
        swapped = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        calls = []
        swapped_norm = getattr(swapped, ATTRIBUTE)[0]
        assert isinstance(swapped_norm, torch.nn.SyncBatchNorm)
        swapped_norm.register_forward_hook(lambda *_: calls.append(1))
        swapped(x)
        assert calls == [1]


def test_albunet_refuses_it_and_auto_follows_the_start(tmp_path):
    project = ["--project-dir", str(tmp_path)]
    with pytest.raises(ArgsError, match="--train-batchnorm on: AlbuNet"):
        parse_config([*project, "--model", "AlbuNet", "--train-batchnorm", "on"])

    def resolved(*flags, weights="none"):
        return resolve_train_batchnorm(parse_config([*project, *flags]).replace(encoder_weights=weights))

    assert resolved("--model", "UNet16") == "on"
    assert resolved("--model", "UNet16", weights="imagenet") == "off"  # trained layers: as it was
    assert resolved("--model", "UNet", "--custom-weights", str(tmp_path / "w.pth")) == "off"
    assert resolved("--model", "LinkNet34") == "on"
    assert resolved("--model", "LinkNet34", weights="imagenet") == "off"
    assert resolved("--model", "AlbuNet") == "off"
    assert resolved("--model", "UNet", "--preset", "original") == "off"
    assert resolved("--model", "UNet11", "--train-batchnorm", "off") == "off"
    assert resolved("--model", "UNet11", "--train-batchnorm", "on", weights="imagenet") == "on"
