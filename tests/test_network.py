import pytest
import torch

from flare_c2f_extensions.cascade.networks import ResUNetASPP, count_parameters, describe
from flare_c2f_extensions.labels import NUM_CLASSES


def test_paper_size_within_one_percent():
    # Chen, Xu, Zhang (FLARE 2022): 15.17 M parameters, 93.43 G at 128^3 and 182.49 G at 160^3 (ours: 0.13% off).
    info = describe(128)
    assert abs(info["parameters"] - 15.17e6) / 15.17e6 < 0.01
    assert abs(info["gmacs"] - 93.43) / 93.43 < 0.01
    assert abs(describe(160)["gmacs"] - 182.49) / 182.49 < 0.01


def test_forward_shape_and_gradient():
    net = ResUNetASPP(out_channels=NUM_CLASSES, channels=(4, 8, 8, 8, 8))
    x = torch.rand(2, 1, 32, 32, 16, requires_grad=True)
    y = net(x)
    assert y.shape == (2, NUM_CLASSES, 32, 32, 16)
    y.mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_configurable_depth_width_and_blocks():
    shallow = ResUNetASPP(channels=(4, 8, 16), blocks_per_level=2, aspp_dilations=(1, 3))
    assert shallow.num_levels == 2
    assert shallow(torch.rand(1, 1, 8, 8, 8)).shape == (1, 14, 8, 8, 8)
    assert count_parameters(ResUNetASPP(channels=(4, 8, 16), blocks_per_level=2)) > count_parameters(
        ResUNetASPP(channels=(4, 8, 16), blocks_per_level=1)
    )


def test_he_normal_initialisation():
    net = ResUNetASPP(channels=(16, 32, 64, 64, 64))
    conv = net.encoder[1][0].conv1.conv
    fan_in = conv.weight[0].numel()
    # kaiming normal for leaky ReLU (slope 0.01): std = gain / sqrt(fan_in), gain ~ sqrt(2)
    expected = (2.0 / (1 + 0.01**2)) ** 0.5 / fan_in**0.5
    assert abs(conv.weight.std().item() - expected) / expected < 0.05


def test_indivisible_input_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 16"):
        ResUNetASPP(channels=(4, 8, 8, 8, 8))(torch.rand(1, 1, 24, 32, 32))
