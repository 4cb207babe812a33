"""The torchvision-compatible classifiers: published figures, state_dict parity with torchvision, heads, export.

Parity uses torchvision's own builders (weights=None) re-initialised to realistic magnitudes, so a wrong layer
order, a missing activation, a wrong BatchNorm eps or a mis-scaled channel count changes the logits far beyond
the 1e-5 tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.ops import StochasticDepth

from edgedeploy.errors import CheckpointError
from edgedeploy.models import create_model, get_model_info, list_models
from edgedeploy.models.complexity import count_macs, count_params

FAMILIES = ("mobilenetv2", "mobilenetv3", "shufflenetv2", "efficientnet", "efficientnetv2")
VARIANTS = [n for n in list_models("classify") if get_model_info(n).family in FAMILIES]
# Large variants are compared at a small input: layout and numerics do not depend on the resolution.
PARITY_IMGSZ = {"efficientnet_b5": 64, "efficientnet_b6": 64, "efficientnet_b7": 64,
                "efficientnetv2_m": 64, "efficientnetv2_l": 64}


def torchvision_counterpart(name: str) -> nn.Module | None:
    info = get_model_info(name)
    if info.torchvision_name:
        return torchvision.models.get_model(info.torchvision_name, weights=None)
    if "torchvision_builder" in info.extra:
        builder, kwargs = info.extra["torchvision_builder"]
        return torchvision.models.get_model(builder, weights=None, **kwargs)
    return None


@torch.no_grad()
def randomise_(model: nn.Module, calib: torch.Tensor, seed: int = 0) -> nn.Module:
    """Give every weight a realistic random value and set BatchNorm statistics from `calib`; returns `model` in eval.

    Works on a model whose tensors are uninitialised (built on the meta device, then `to_empty`). Convolutions and
    linears get fan-in scaled normal weights and non-zero biases; BatchNorm affines are spread around (1, 0); running
    statistics become the per-channel mean/var of `calib` flowing through the network (all other layers in eval).
    Randomly initialised deep nets are chaotic: running stats that do not match the data make activations explode,
    so comparisons should run on `calib` itself, where every layer sees O(1) activations and logits have std ~1.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            gain = 3.0 if isinstance(m, nn.Linear) else 1.0
            m.weight.normal_(0.0, gain / math.sqrt(m.weight[0].numel()), generator=gen)
            if m.bias is not None:
                m.bias.normal_(0.0, 0.1, generator=gen)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.75, 1.25, generator=gen)
            m.bias.normal_(0.0, 0.1, generator=gen)
            m.reset_running_stats()
            norms.append((m, m.momentum))
            m.momentum = None  # cumulative average: one pass sets the statistics exactly
    model.eval()
    for m, _ in norms:
        m.train()
    model(calib)
    for m, momentum in norms:
        m.momentum = momentum
    return model.eval()


def regularisers(model: nn.Module) -> list[tuple]:
    """Dropout / stochastic-depth probabilities and BatchNorm eps/momentum, in module order."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            out.append(("dropout", m.p))
        elif isinstance(m, StochasticDepth):
            out.append(("stochastic_depth", round(m.p, 6), m.mode))
        elif isinstance(m, nn.BatchNorm2d):
            out.append(("bn", m.eps, m.momentum))
    return out


def test_zoo_is_complete():
    expected = {
        *(f"mobilenetv2_{w}" for w in ("050", "075", "100", "140")),
        "mobilenetv3_large", "mobilenetv3_small",
        *(f"shufflenetv2_x{w}" for w in ("0_5", "1_0", "1_5", "2_0")),
        *(f"efficientnet_b{i}" for i in range(8)),
        *(f"efficientnetv2_{s}" for s in "sml"),
    }
    assert expected <= set(VARIANTS)
    for alias, target in {"mobilenetv2": "mobilenetv2_100", "mobilenetv3": "mobilenetv3_large",
                          "shufflenetv2": "shufflenetv2_x1_0", "efficientnet": "efficientnet_b0",
                          "efficientnetv2": "efficientnetv2_s"}.items():
        assert get_model_info(alias).name == target


@pytest.mark.parametrize("name", VARIANTS)
def test_published_figures(name):
    info = get_model_info(name)
    assert info.published_macs, f"{name} has no published MACs"
    assert info.source
    # On the meta device the counter sees every op with its real shapes but computes nothing, so even
    # EfficientNet-B7 at 600 px costs about a second.
    with torch.device("meta"):
        model = create_model(name)
        params = count_params(model)
        macs = count_macs(model, info.imgsz)
    if info.published_params is not None:
        assert abs(params / info.published_params - 1) <= 0.01, (params, info.published_params)
    assert abs(macs / info.published_macs - 1) <= 0.03, (macs, info.published_macs)


@pytest.mark.parametrize("name", VARIANTS)
def test_torchvision_state_dict_parity(name):
    info = get_model_info(name)
    assert info.torchvision_name or "torchvision_builder" in info.extra, f"{name} should name its torchvision twin"
    imgsz = PARITY_IMGSZ.get(name, 96)
    x = torch.randn(2, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(1))
    # Both built on the meta device (skipping their own init, which dominates the cost for the big variants);
    # torchvision's gets real storage and random weights, ours takes its state_dict strictly.
    with torch.device("meta"):
        reference = torchvision_counterpart(name)
        ours = create_model(name)
    randomise_(reference.to_empty(device="cpu"), x)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    ours.eval()
    assert regularisers(ours) == regularisers(reference)

    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert got.shape == expected.shape == (2, 1000)
    assert expected.std() > 0.5, f"reference logits too flat to be a meaningful comparison: std {expected.std():.3g}"
    rel_err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel_err <= 1e-5, rel_err


@pytest.mark.parametrize("arch", ["large", "small"])
def test_dilated_mobilenetv3_backbone_matches_torchvision(arch):
    """The segmentation-backbone form (last stage dilated instead of strided, output stride 16)."""
    x = torch.randn(2, 3, 64, 64)
    reference = randomise_(torchvision.models.get_model(f"mobilenet_v3_{arch}", weights=None, dilated=True), x)
    ours = create_model(f"mobilenetv3_{arch}", dilated=True)
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    with torch.no_grad():
        expected_features, got_features = reference.features(x), ours.features(x)
        assert got_features.shape[-1] == 64 // 16
        torch.testing.assert_close(got_features, expected_features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    assert [i for i, m in enumerate(ours.features) if getattr(m, "_is_cn", False)] == [
        i for i, m in enumerate(reference.features) if getattr(m, "_is_cn", False)
    ]


@pytest.mark.parametrize("name", VARIANTS)
def test_num_classes_changes_only_the_head(name):
    with torch.device("meta"):
        default = create_model(name).state_dict()
        custom_model = create_model(name, num_classes=7)
        custom = custom_model.state_dict()
        out = custom_model.eval()(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 7)
    assert list(custom) == list(default)
    changed = {k for k in default if default[k].shape != custom[k].shape}
    head = [k for k in default if k.endswith(".weight") and default[k].shape[:1] == (1000,)]
    assert len(head) == 1
    assert changed == {head[0], head[0].replace(".weight", ".bias")}


def test_torchvision_checkpoint_file_loads_through_create_model(tmp_path):
    x = torch.randn(2, 3, 64, 64)
    reference = randomise_(torchvision.models.mobilenet_v3_small(weights=None, num_classes=10), x)
    path = tmp_path / "mnv3s_tv.pth"
    torch.save(reference.state_dict(), path)

    model = create_model("mobilenetv3_small", num_classes=10, weights=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)

    with pytest.raises(CheckpointError, match="--num-classes 10"):
        create_model("mobilenetv3_small", weights=str(path))


@pytest.mark.parametrize("name", ["shufflenetv2_x0_5", "mobilenetv3_small", "efficientnet_b0"])
def test_exports_to_onnx_with_dynamic_batch(name, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(3, 3, 64, 64)  # a batch size other than the traced one
    model = randomise_(create_model(name, num_classes=10), x)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        model, torch.randn(1, 3, 64, 64), str(path), opset_version=17, dynamo=False,
        input_names=["images"], output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load(str(path)))
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    rel_err = (torch.from_numpy(got) - expected).abs().max() / expected.abs().max()
    assert rel_err < 1e-4
