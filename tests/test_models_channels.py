"""`models.channels.make_divisible`: one function, the rounding rule named at each call site."""

import pytest
import torch.nn as nn

from edgedeploy.models.channels import make_divisible
from edgedeploy.models.complexity import count_macs, count_macs_thop_convention, count_params, count_params_bn_folded


def test_nearest_is_the_torchvision_rule_and_ceil_the_yolov5_rule():
    assert make_divisible(17, 8, rounding="nearest") == 16  # nearest multiple, within 10%
    assert make_divisible(17, 8, rounding="ceil") == 24  # next multiple up
    assert make_divisible(10, 8, rounding="nearest") == 16  # 8 would drop 20%: one step up
    assert make_divisible(3, 8, rounding="nearest") == 8 and make_divisible(3, 8, rounding="nearest", min_value=4) == 4
    assert make_divisible(3, 4, rounding="nearest", min_value=2) == 4
    assert make_divisible(0, 8, rounding="ceil") == 0  # min_value belongs to the nearest rule only
    assert make_divisible(1280 * 0.75, rounding="nearest") == 960 and make_divisible(64 * 0.25, rounding="ceil") == 16
    with pytest.raises(ValueError, match="rounding"):
        make_divisible(16, rounding="floor")


def test_complexity_counts_of_a_conv_bn_pair():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    assert count_params(net) == 3 * 8 * 9 + 2 * 8
    assert count_params_bn_folded(net) == 3 * 8 * 9 + 8  # BN scale+shift become one conv bias
    assert count_macs(net, (4, 6)) == 4 * 6 * 8 * 3 * 9
    assert count_macs_thop_convention(net, (4, 6)) == 4 * 6 * 8 * 3 * 9 + 2 * 8 * 4 * 6


def test_init_weights_policies():
    import math

    import pytest
    import torch
    import torch.nn as nn

    from edgedeploy.models.initialisation import init_weights

    def net():
        return nn.Sequential(nn.Conv2d(3, 64, 3, bias=True), nn.BatchNorm2d(64), nn.LayerNorm(8), nn.Linear(256, 1000))

    torch.manual_seed(0)
    for linear, check in (("normal", lambda w: abs(w.std().item() - 0.01) < 5e-4),
                          ("uniform", lambda w: w.abs().max().item() <= 1 / math.sqrt(1000) and w.abs().max().item() > 0.03),
                          ("trunc_normal", lambda w: abs(w.std().item() - 0.02) < 1e-3 and w.abs().max().item() <= 2.0)):
        m = net()
        init_weights(m, linear=linear)
        conv, bn, ln, fc = m
        assert check(fc.weight.detach()), linear
        assert abs(conv.weight.std().item() - math.sqrt(2 / (64 * 9))) < 0.01  # Kaiming fan_out, ReLU gain
        assert all(torch.count_nonzero(b) == 0 for b in (conv.bias, bn.bias, ln.bias, fc.bias))
        assert torch.all(bn.weight == 1) and torch.all(ln.weight == 1)
    with pytest.raises(ValueError, match="linear='xavier'"):
        init_weights(net(), linear="xavier")
