"""Structural surgery with Torch-Pruning: smaller modules, working forward, exact param counts."""

import pytest
import torch

from mipp.errors import ConfigError
from mipp.groups import apply_keep_sets, count_params, find_unit_groups, replay_history
from mipp.zoo import build_model


def _keep_every_other(groups):
    return {g.name: list(range(0, g.size, 2)) for g in groups}


def test_lenet5_groups_and_exact_parameter_count():
    model = build_model("lenet5", (1, 28, 28), 10, seed=0)
    x = torch.randn(4, 1, 28, 28)
    groups = find_unit_groups(model, x)
    assert [(g.name, g.size) for g in groups] == [("conv1", 6), ("conv2", 16), ("fc1", 120),
                                                   ("fc2", 84)]
    keep = {"conv1": [0, 2, 4], "conv2": list(range(8)), "fc1": list(range(30)),
            "fc2": list(range(20))}
    apply_keep_sets(model, x, keep)
    # conv1 1->3 (5x5), conv2 3->8 (5x5), fc1 8*5*5 -> 30, fc2 30->20, fc3 20->10, with biases
    expected = (3 * 25 + 3) + (8 * 3 * 25 + 8) + (200 * 30 + 30) + (30 * 20 + 20) + (20 * 10 + 10)
    assert count_params(model) == expected
    assert model(x).shape == (4, 10)
    assert model.conv1.out_channels == 3 and model.fc1.in_features == 200


@pytest.mark.parametrize("arch,shape,config", [
    ("vgg11", (3, 32, 32), {"width_mult": 0.25}),
    ("resnet20", (1, 28, 28), {}),
])
def test_conv_nets_shrink_and_replay(arch, shape, config):
    model = build_model(arch, shape, 10, seed=0, **config)
    x = torch.randn(2, *shape)
    groups = find_unit_groups(model, x)
    before = count_params(model)
    keep = _keep_every_other(groups)
    history = apply_keep_sets(model, x, keep)
    assert model(x).shape == (2, 10)
    assert count_params(model) < before
    for g in groups:  # every member of a group now has the kept width
        for member in g.members:
            module = dict(model.named_modules())[member]
            width = getattr(module, "out_channels", None) or module.out_features
            assert width == len(keep[g.name]), (g.name, member)
    fresh = build_model(arch, shape, 10, seed=0, **config)
    replay_history(fresh, x, history)
    assert count_params(fresh) == count_params(model)


def test_resnet20_residual_stream_is_one_group_with_every_block():
    model = build_model("resnet20", (1, 28, 28), 10, seed=0)
    groups = find_unit_groups(model, torch.randn(2, 1, 28, 28))
    stream = max(groups, key=lambda g: len(g.members))
    # the stem and the second conv of each of the 3 first-stage blocks add into one stream
    assert len(stream.members) >= 4
    assert len(stream.consumers) >= 3
    # 3 stages of 3 blocks: 9 inner groups + 3 streams
    assert len(groups) == 12


def test_keep_sets_are_checked():
    model = build_model("mlp", (64,), 10, widths=[16, 8])
    x = torch.randn(2, 64)
    with pytest.raises(ConfigError, match="empty"):
        apply_keep_sets(model, x, {"fc1": []})
    with pytest.raises(ConfigError, match="outside"):
        apply_keep_sets(model, x, {"fc1": [0, 16]})
    with pytest.raises(ConfigError, match="not a module"):
        apply_keep_sets(model, x, {"nope": [0]})
    with pytest.raises(ConfigError, match="ignored_layers"):
        find_unit_groups(model, x, ignored=["fc9"])
    assert [g.name for g in find_unit_groups(model, x, ignored=["fc1"])] == ["fc2"]
