"""Model zoo: every architecture builds for every input kind, weights round-trip, bad input fails
with a ModelError that names the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mipp.errors import ModelError
from mipp.zoo import ModelSpec, build_model, list_architectures, load_weights, save_weights

IMAGE_ARCHS = ["lenet5", "vgg11", "vgg16", "vgg19", "resnet18", "resnet20", "resnet56"]
# Small widths keep the big networks fast; lenet5/mlp are small already.
SMALL = {"vgg11": {"width_mult": 0.125}, "vgg16": {"width_mult": 0.125},
         "vgg19": {"width_mult": 0.125}, "resnet18": {"width_mult": 0.125},
         "resnet20": {"width_mult": 0.5}, "resnet56": {"width_mult": 0.25},
         "lenet5": {}, "mlp": {"widths": [32, 16]}}
CASES = [((1, 28, 28), 10), ((3, 32, 32), 100), ((1, 8, 8), 10)]


pytestmark = pytest.mark.usefixtures("one_thread")


def last_linear(model: nn.Module) -> nn.Linear:
    return [m for _, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def test_registry_lists_every_architecture():
    assert list_architectures() == sorted(IMAGE_ARCHS + ["mlp"])


@pytest.mark.parametrize("arch", IMAGE_ARCHS + ["mlp"])
@pytest.mark.parametrize("shape,classes", CASES)
def test_builds_with_classifier_last(arch, shape, classes):
    model = build_model(arch, shape, classes, **SMALL[arch]).eval()
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, classes)
    assert last_linear(model).out_features == classes


def test_mlp_on_flat_input_has_named_layers():
    model = build_model("mlp", (64,), 10)
    assert (model.fc1.in_features, model.fc1.out_features) == (64, 300)
    assert (model.fc2.out_features, model.fc3.out_features) == (100, 10)
    assert model(torch.randn(4, 64)).shape == (4, 10)
    assert last_linear(model) is model.fc3


def test_lenet5_classic_shapes_on_28x28():
    model = build_model("lenet5", (1, 28, 28), 10)
    assert model.fc1.in_features == 16 * 5 * 5
    assert [model.fc1.out_features, model.fc2.out_features] == [120, 84]


def test_lenet5_config_changes_widths():
    model = build_model("lenet5", (1, 8, 8), 10, channels=[4, 8], widths=[20, 10])
    assert (model.conv1.out_channels, model.conv2.out_channels) == (4, 8)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_resnet_shortcuts_are_option_b():
    model = build_model("resnet20", (3, 32, 32), 10)
    assert model.layer1[0].downsample is None
    down = model.layer2[0].downsample
    assert isinstance(down[0], nn.Conv2d) and down[0].kernel_size == (1, 1)
    assert isinstance(down[1], nn.BatchNorm2d)
    assert len(model.layer3) == 3 and len(build_model("resnet56", (3, 8, 8), 10).layer3) == 9


def test_seed_gives_same_weights_without_touching_global_rng():
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    a = build_model("mlp", (8,), 3, seed=7, widths=[5])
    assert torch.rand(1) == before
    b = build_model("mlp", (8,), 3, seed=7, widths=[5])
    assert torch.equal(a.fc1.weight, b.fc1.weight)


def test_model_spec_builds_and_is_frozen():
    spec = ModelSpec(arch="resnet20", input_shape=(3, 16, 16), num_classes=5,
                     config={"width_mult": 0.25})
    model = spec.build()
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 5)
    assert model.zoo_spec == spec
    with pytest.raises(Exception):
        spec.arch = "vgg11"
    with pytest.raises(Exception):
        ModelSpec(arch="mlp", input_shape=(4,), num_classes=2, colour="red")


@pytest.mark.parametrize("arch,config,needle", [
    ("resnet99", {}, "resnet99"),
    ("vgg11", {"depth": 3}, "depth"),
    ("resnet20", {"width_mult": -1}, "width_mult"),
    ("mlp", {"widths": [10, 0]}, "widths"),
    ("lenet5", {"channels": [6]}, "channels"),
])
def test_bad_arch_or_config_names_the_field(arch, config, needle):
    with pytest.raises(ModelError, match=needle) as info:
        build_model(arch, (1, 28, 28), 10, **config)
    if arch == "resnet99":
        assert "lenet5" in str(info.value) and "vgg19" in str(info.value)
    else:
        assert "Valid config fields" in str(info.value)


def test_image_arch_refuses_flat_input():
    with pytest.raises(ModelError, match="mlp"):
        build_model("lenet5", (64,), 10)
    with pytest.raises(ModelError, match="num_classes"):
        build_model("mlp", (64,), 1)


@pytest.mark.parametrize("suffix,fmt", [(".safetensors", None), (".pt", None), (".w", "pt")])
def test_weights_roundtrip_reproduces_outputs(tmp_path, suffix, fmt):
    model = build_model("resnet20", (3, 16, 16), 10, width_mult=0.25).eval()
    with torch.no_grad():  # give BN buffers non-default values so they are checked too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_weights(model, path)
    else:
        torch.save({"state_dict": model.state_dict()}, path)
    fresh = build_model("resnet20", (3, 16, 16), 10, width_mult=0.25).eval()
    load_weights(fresh, path, fmt=fmt)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), fresh(x))


def test_wrong_shapes_name_keys_and_class_count(tmp_path):
    path = save_weights(build_model("lenet5", (1, 28, 28), 100), tmp_path / "w.safetensors")
    with pytest.raises(ModelError, match=r"fc3\.weight.*100 classes") as info:
        load_weights(build_model("lenet5", (1, 28, 28), 10), path)
    assert "lenet5" in str(info.value)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build_model("mlp", (64,), 10, widths=[8, 8, 8]).state_dict(), path)
    with pytest.raises(ModelError, match="unexpected keys: fc4") as info:
        load_weights(build_model("mlp", (64,), 10, widths=[8, 8]), path)
    assert "fc4.weight" in str(info.value)
    assert "fc3.weight: file (8, 8) vs model (10, 8)" in str(info.value)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(build_model("mlp", (4,), 2, widths=[3]), path)
    with pytest.raises(ModelError, match="pickled Python objects"):
        load_weights(build_model("mlp", (4,), 2, widths=[3]), path)


@pytest.mark.parametrize("name", ["bad.safetensors", "bad.pt"])
def test_corrupt_file_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00garbage" * 32)
    with pytest.raises(ModelError, match=name):
        load_weights(build_model("mlp", (4,), 2), path)


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(ModelError, match="fmt"):
        load_weights(build_model("mlp", (4,), 2), tmp_path / "w.xyz")
    with pytest.raises(ModelError, match="does not exist"):
        load_weights(build_model("mlp", (4,), 2), tmp_path / "w.safetensors")


def test_pt_file_with_non_tensor_values_is_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"fc1.weight": [1, 2, 3]}, path)
    with pytest.raises(ModelError, match="state_dict"):
        load_weights(build_model("mlp", (4,), 2), path)
