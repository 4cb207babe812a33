"""LR-ASPP: torchvision state-dict compatibility, published size, export-safe pooling, registry entries."""

import pytest
import torch
import torch.nn as nn

from edgedeploy.models import create_model, get_model_info
from edgedeploy.models.complexity import count_macs, count_params
from edgedeploy.models.lraspp import GlobalMeanPool


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights: random BatchNorm statistics/affines and larger conv weights, so outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            elif isinstance(m, nn.Conv2d) and m.out_channels < 64:  # classifier convs: logits of realistic spread
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def balance_classes(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Centre and scale the logits on `x` (per class: zero mean, unit spatial spread) so the per-pixel argmax
    varies over the image -- random weights otherwise let one class's offset win everywhere."""
    head = model.classifier
    with torch.no_grad():
        logits = model(x)
        mean = logits.mean((0, 2, 3))
        spread = (logits - mean[None, :, None, None]).std()
        for conv in (head.low_classifier, head.high_classifier):
            conv.bias.sub_(mean / 2)
            conv.weight.div_(spread)
            conv.bias.div_(spread)
    return model


def test_registry_entries():
    info = get_model_info("lraspp")
    assert info.name == "lraspp_mobilenetv3_large"
    assert get_model_info("lraspp_mobilenetv3").name == info.name
    assert info.task == "segment" and info.default_num_classes == 21 and info.imgsz == 520
    assert info.published_params == 3_221_538 and info.published_macs == pytest.approx(2.086e9)
    assert get_model_info("lraspp_mobilenetv3_small").task == "segment"


def test_params_and_macs_match_torchvision_figures():
    model = create_model("lraspp")
    assert abs(count_params(model) - 3_221_538) / 3_221_538 < 0.01
    assert count_params(model) == 3_221_538  # exact: same layers as torchvision
    macs = count_macs(model, 520)
    assert abs(macs - 2.086e9) / 2.086e9 < 0.01
    small = create_model("lraspp_mobilenetv3_small", num_classes=5)
    assert count_params(small) < count_params(model) / 2


def test_torchvision_state_dict_loads_strictly_and_outputs_match(tmp_path):
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    tv = randomise(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)).eval()
    ours = create_model("lraspp_mobilenetv3_large").eval()
    assert list(ours.state_dict()) == list(tv.state_dict())
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 72, 104)  # not multiples of 32: the pooling branch must still agree
    with torch.no_grad():
        expected = tv(x)["out"]
        got = ours(x)
    assert got.shape == expected.shape == (2, 21, 72, 104)
    assert expected.std() > 0.5  # outputs are not ~0, so agreement is meaningful
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and through our checkpoint loader (a bare torchvision state_dict file, as torchvision ships it)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    other = create_model("lraspp", weights=str(tmp_path / "tv.pth")).eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)


def test_global_mean_pool_equals_adaptive_pool():
    x = torch.randn(2, 8, 17, 23)
    torch.testing.assert_close(GlobalMeanPool()(x), nn.AdaptiveAvgPool2d(1)(x))


def test_upsample_switch_and_class_count():
    model = randomise(create_model("lraspp_mobilenetv3_small", num_classes=4)).eval()
    x = torch.randn(1, 3, 100, 132)
    with torch.no_grad():
        full = model(x)
        model.upsample = False
        low = model(x)
    assert full.shape == (1, 4, 100, 132)
    assert low.shape == (1, 4, 13, 17)  # stride 8, rounded up
    resized = torch.nn.functional.interpolate(low, size=(100, 132), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized, full)
