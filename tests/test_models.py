"""Every registered architecture: shapes, gradients, the original app's checkpoint layout, encoder weights."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision

from custom_net.pretrained import EncoderWeightsMissing
from custom_net.model import EvenOutputConvTranspose2d, UnknownModelError, build_model, fold_batchnorm, model_list
from tests.helpers import shared_path

ARCHITECTURES = sorted(model_list)


@pytest.fixture(scope="module")
def reference():
    return json.loads(shared_path("reference", "original_state_dicts.json").read_text())


def test_registry_entries_are_complete():
    for name, entry in model_list.items():
        assert {"class", "description", "pretrained_encoder"} <= entry.keys(), name
        assert entry["description"]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_forward_backward_64(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 4, 64, 64)
    logits.logsumexp(1).mean().backward()
    # The ResNet classifier (encoder.fc) is kept for checkpoint compatibility but never used.
    grads = [p.grad for n, p in model.named_parameters() if not n.startswith("encoder.fc.")]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("size", [(96, 64), (50, 70)])
def test_any_input_size_gives_same_size_output(name, size):
    model = build_model(name, num_classes=2).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, *size)).shape == (1, 2, *size)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_original_checkpoint_loads_strictly(name, reference):
    """A state dict with the original app's keys and shapes (num_classes=3) loads strictly, in the same order."""
    if name not in reference["models"]:
        pytest.skip(f"{name} is not an architecture of the original app")
    expected = reference["models"][name]
    model = build_model(name, num_classes=reference["num_classes"])
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k, s) for k, s in expected["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == expected["parameters"]

    # Layers registered twice (encoder.N and convN.M) share storage, in the original as here.
    torch.manual_seed(1)
    by_storage = {}
    original = {}
    for key, value in model.state_dict().items():
        if value.data_ptr() not in by_storage:
            by_storage[value.data_ptr()] = torch.randn(value.shape) if value.dim() else torch.tensor(7)
        original[key] = by_storage[value.data_ptr()]
    model.load_state_dict(original, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key].to(value.dtype)), key


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3).eval()
    path = tmp_path / "model_001.pth"
    torch.save(model.state_dict(), path)
    restored = build_model(name, num_classes=3).eval()
    restored.load_state_dict(torch.load(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), restored(x))


def _pretrained(name):
    return [n for n in ARCHITECTURES if model_list[n]["pretrained_encoder"]]


@pytest.mark.parametrize("name", _pretrained(None))
def test_missing_imagenet_weights_explain_what_to_do(name, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(EncoderWeightsMissing) as err:
        build_model(name, num_classes=2, encoder_weights="imagenet")
    message = str(err.value)
    assert "download.pytorch.org" in message and str(tmp_path) in message and "--encoder-weights" in message


@pytest.mark.parametrize("name", ["UNet11", "LinkNet34"])
def test_encoder_weights_from_cache_and_from_file(name, tmp_path, monkeypatch):
    """Weights are read from the torch cache (as torchvision names them) or from an explicit file."""
    encoder = model_list[name]["pretrained_encoder"]
    weights = torchvision.models.get_model_weights(encoder).IMAGENET1K_V1
    torch.manual_seed(3)
    source = getattr(torchvision.models, encoder)(weights=None).state_dict()
    cache = tmp_path / "checkpoints"
    cache.mkdir()
    torch.save(source, cache / weights.url.rsplit("/", 1)[1])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    first_conv = "features.0.weight" if encoder.startswith("vgg") else "conv1.weight"
    from_cache = build_model(name, num_classes=2, encoder_weights="imagenet")
    from_file = build_model(name, num_classes=2, encoder_weights=str(cache / weights.url.rsplit("/", 1)[1]))
    for model in (from_cache, from_file):
        conv = model.encoder[0].weight if encoder.startswith("vgg") else model.firstconv.weight
        assert torch.equal(conv, source[first_conv])


class _WeightsServer:
    """Serves the files of a folder on 127.0.0.1, as a weights mirror would."""

    def __init__(self, folder):
        import functools
        import http.server
        import threading
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *args: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def resnet34_mirror(tmp_path, monkeypatch):
    """A mirror serving a resnet34 state dict under a torchvision-style name whose hash prefix is its own,
    an empty torch cache, and the mirror as UNET_WEIGHTS_MIRROR. Yields (weights, file name, cache, served)."""
    import hashlib
    from custom_net import pretrained
    served = tmp_path / "served"
    served.mkdir()
    torch.manual_seed(5)
    weights = torchvision.models.resnet34(weights=None).state_dict()
    torch.save(weights, served / "resnet34.pth")
    name = f"resnet34-{hashlib.sha256((served / 'resnet34.pth').read_bytes()).hexdigest()[:8]}.pth"
    (served / "resnet34.pth").rename(served / name)
    server = _WeightsServer(served)
    monkeypatch.setenv("UNET_WEIGHTS_MIRROR", server.url)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    official = pretrained.official_url
    monkeypatch.setattr(pretrained, "official_url", lambda encoder: official(encoder).rsplit("/", 1)[0] + "/" + name
                        if encoder == "resnet34" else official(encoder))
    yield weights, name, tmp_path / "hub" / "checkpoints", served
    server.close()


def test_imagenet_weights_are_downloaded_into_the_torch_cache(resnet34_mirror, capsys):
    weights, name, cache, _ = resnet34_mirror
    model = build_model("LinkNet34", num_classes=2, encoder_weights="imagenet")
    assert torch.equal(model.firstconv.weight, weights["conv1.weight"])
    assert (cache / name).is_file() and [p.name for p in cache.iterdir()] == [name]  # no temporary file left
    assert name in capsys.readouterr().err  # the progress bar
    build_model("AlbuNet", num_classes=2, encoder_weights="imagenet")  # from the cache now
    assert [p.name for p in cache.iterdir()] == [name]


def test_a_corrupt_download_is_refused(resnet34_mirror):
    _, name, cache, served = resnet34_mirror
    (served / name).write_bytes(b"not the weights" * 1000)
    with pytest.raises(EncoderWeightsMissing, match="does not match") as err:
        build_model("LinkNet34", num_classes=2, encoder_weights="imagenet")
    assert str(cache / name) in str(err.value)
    assert not cache.exists() or not any(cache.iterdir())


def test_unet_refuses_encoder_weights():
    with pytest.raises(UnknownModelError, match="no pretrained encoder"):
        build_model("UNet", num_classes=2, encoder_weights="imagenet")


def test_unknown_model_lists_choices():
    with pytest.raises(UnknownModelError) as err:
        build_model("UNet99", num_classes=2)
    assert all(name in str(err.value) for name in model_list)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_folded_batchnorm_computes_the_same_function(name):
    """Running statistics far from (0, 1) make a wrong fold visible; the original model stays as it was."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.2, 3)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    keys = list(model.state_dict())
    folded = fold_batchnorm(model)
    x = torch.randn(2, 3, 96, 128)
    with torch.inference_mode():
        expected, got = model(x), folded(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert list(model.state_dict()) == keys  # the training layout is untouched
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert left == 0
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        assert folded is not model


@pytest.mark.parametrize("kernel, stride, padding, output_padding", [(3, 2, 0, 0), (3, 2, 1, 0), (5, 3, 1, 2), (4, 2, 1, 0)])
def test_even_output_transposed_convolution_is_the_same_layer(kernel, stride, padding, output_padding):
    """Same parameters and, in float32, under bfloat16 autocast and with bfloat16 weights, the same
    outputs and gradients as nn.ConvTranspose2d (the zero-padded kernel taps only add cropped-off rows)."""
    torch.manual_seed(0)
    plain = torch.nn.ConvTranspose2d(8, 6, kernel, stride, padding, output_padding)
    even = EvenOutputConvTranspose2d(8, 6, kernel, stride, padding, output_padding)
    even.load_state_dict(plain.state_dict())
    assert even.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 8, 9, 11).contiguous(memory_format=torch.channels_last)
    for autocast in (False, True):
        outputs, grads = [], []
        for layer in (plain, even):
            layer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = layer(x)
            out.float().square().sum().backward()
            outputs.append(out)
            grads.append(layer.weight.grad.clone())
        assert outputs[0].shape == outputs[1].shape and outputs[0].dtype == outputs[1].dtype
        torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
        torch.testing.assert_close(grads[1], grads[0], rtol=0.02, atol=1e-3)  # bf16 sums in another order
    with torch.no_grad():
        torch.testing.assert_close(even.bfloat16()(x.bfloat16()), plain.bfloat16()(x.bfloat16()), rtol=0, atol=0)
