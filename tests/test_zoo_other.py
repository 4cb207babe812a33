"""MobileNetV1, ShuffleNetV1 and MobileViT: published parameter/MAC figures, shapes, heads, ONNX export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from edgedeploy.errors import InputError
from edgedeploy.models import create_model, get_model_info, list_models
from edgedeploy.models.complexity import count_macs, count_params

FAMILIES = ("mobilenetv1", "shufflenetv1", "mobilevit")
VARIANTS = [n for n in list_models() if get_model_info(n).family in FAMILIES]

# mobilevit_xxs: the published 0.42 GMACs were counted with fvcore, which adds BatchNorm/LayerNorm element ops
# (fvcore on this model gives 0.418 G); FlopCounterMode's conv/matmul-only count is 0.4074 G, -3.01%.
FVCORE_GAP = {"mobilevit_xxs"}


def test_every_variant_is_registered():
    assert len(VARIANTS) == 4 + 8 + 3
    assert get_model_info("mobilenetv1").name == "mobilenetv1_100"
    assert get_model_info("shufflenetv1").name == "shufflenetv1_g3_x1_0"
    assert get_model_info("mobilevit").name == "mobilevit_s"


@pytest.mark.parametrize("name", VARIANTS)
def test_params_match_published(name):
    info = get_model_info(name)
    with torch.device("meta"):  # parameter shapes are all that matter here
        ours = count_params(create_model(name))
    # A figure published to 0.1M cannot be checked tighter than half that step.
    tolerance = max(0.01 * info.published_params, info.extra.get("params_precision", 0) / 2)
    assert abs(ours - info.published_params) <= tolerance, (ours, info.published_params)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="fvcore counts norm ops")) if n in FVCORE_GAP else n
        for n in VARIANTS
    ],
)
def test_macs_match_published(name):
    info = get_model_info(name)
    with torch.device("meta"):  # shapes only: fast, and the count is identical
        model = create_model(name)
    ours = count_macs(model, info.imgsz)
    assert abs(ours - info.published_macs) <= 0.03 * info.published_macs, (ours, info.published_macs)


def test_mobilevit_xxs_macs_gap_is_the_norm_ops():
    """The one MACs gap above is explained: adding fvcore's norm-op counts (BN 2/elem, LN 5/elem) closes it."""
    model = create_model("mobilevit_xxs").eval()
    norm_ops = 0

    def hook(module, inputs, _output):
        nonlocal norm_ops
        norm_ops += inputs[0].numel() * (2 if isinstance(module, nn.BatchNorm2d) else 5)

    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.register_forward_hook(hook)
    macs = count_macs(model, 256)
    assert abs(macs + norm_ops - 0.42e9) <= 0.01 * 0.42e9


@pytest.mark.parametrize("name,size", [("mobilenetv1_025", 128), ("shufflenetv1_g8_x0_5", 96), ("mobilevit_xxs", 128)])
def test_forward_shape_and_num_classes_changes_only_the_head(name, size):
    base, small = create_model(name).eval(), create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = small(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    base_sd, small_sd = base.state_dict(), small.state_dict()
    assert base_sd.keys() == small_sd.keys()
    differing = {k for k in base_sd if base_sd[k].shape != small_sd[k].shape}
    head = small.classifier if isinstance(small.classifier, nn.Linear) else small.classifier[-1]
    assert head.out_features == 7
    assert differing and all(k.startswith("classifier.") for k in differing)
    fc = base.num_features
    assert count_params(base) - count_params(small) == (1000 - 7) * (fc + 1)


def test_mobilevit_rejects_sizes_its_patches_cannot_tile():
    model = create_model("mobilevit_xxs").eval()
    with pytest.raises(InputError, match="multiple of 64"):
        model(torch.zeros(1, 3, 224, 224))


def test_shufflenet_unit_structure_follows_the_paper():
    model = create_model("shufflenetv1_g3_x1_0")
    first, second = model.features[0], model.features[1]
    assert first.reduce[0].groups == 1  # first pointwise conv of stage 2 is not grouped
    assert second.reduce[0].groups == 3
    assert first.reduce[0].out_channels == 240 // 4  # bottleneck = out / 4
    assert first.expand[0].out_channels == 240 - 24  # stride-2 branch + 24 pooled shortcut channels = 240


def _reinitialise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with realistic scale and non-trivial BN statistics, so logits are far from ~0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def test_mobilevit_xxs_onnx_matches_torch(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _reinitialise(create_model("mobilevit_xxs"))
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    assert ref.std() > 0.5  # non-trivial logits, so an rtol check means something

    path = tmp_path / "mobilevit_xxs.onnx"
    torch.onnx.export(
        model, (x,), str(path), input_names=["images"], output_names=["logits"], opset_version=17, dynamo=False
    )
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"Softmax", "LayerNormalization", "MatMul"} <= ops  # named ops an FP16 converter can keep in FP32
    assert not ops & {"Loop", "If", "NonZero"}  # static graph

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
