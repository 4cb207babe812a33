"""Profiler: MACs of a hand-built model, per-layer table, activation peak, ONNX agreement, and the CLIs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from edgedeploy.benchmarks.profiler import profile_model, profile_onnx
from edgedeploy.cli import main
from edgedeploy.errors import InputError
from edgedeploy.models.complexity import count_macs, count_params


class Mixer(nn.Module):
    """A container that does its own functional matmul besides its children's work."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        return self.proj(x) + (x @ x.transpose(1, 2)) @ x


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw = nn.Conv2d(8, 16, 1)
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)
        self.mix = Mixer(4)
        self.heads = nn.ModuleList([nn.Linear(4, 10), nn.Linear(4, 3)])  # a container that is never called

    def forward(self, x):
        x = self.pw(self.dw(torch.relu(self.bn(self.stem(x)))))
        x = self.up(x)  # (B, 4, H, W)
        x = self.mix(x.flatten(2).transpose(1, 2))  # (B, HW, 4)
        pooled = x.mean(1)
        return torch.cat([head(pooled) for head in self.heads], dim=1)


def expected_tiny_macs(h: int, w: int) -> dict[str, int]:
    """MACs from the layer shapes: output elements x (input channels / groups) x kernel area."""
    h2, w2 = h // 2, w // 2
    n = h2 * 2 * w2 * 2  # tokens after the transposed conv
    return {
        "stem": (8 * h2 * w2) * 3 * 9,
        "dw": (8 * h2 * w2) * 1 * 9,
        "pw": (16 * h2 * w2) * 8,
        "up": (16 * h2 * w2) * 4 * 4,  # every input element feeds C_out x k x k taps
        "mix.proj": n * 4 * 4,
        "mix": n * n * 4 + n * n * 4,  # (N x 4)(4 x N), then (N x N)(N x 4)
        "heads.0": 4 * 10,
        "heads.1": 4 * 3,
    }


def test_tiny_model_macs_are_exact_and_per_layer_rows_sum_to_total():
    expected = expected_tiny_macs(32, 24)
    model = Tiny()
    assert count_macs(model, (32, 24)) == sum(expected.values())
    profile = profile_model(model, (32, 24))
    assert profile.macs == sum(expected.values())
    assert profile.params == count_params(model)
    rows = {r.name: r for r in profile.layers}
    for name, macs in expected.items():
        assert rows[name].macs == macs, name
    assert rows["mix"].type == "Mixer" and rows["mix.proj"].type == "Linear"
    assert "(root)" not in rows and "heads" not in rows  # nothing is left over on the parents
    assert sum(r.macs for r in profile.layers) == profile.macs
    assert sum(r.params for r in profile.layers) == profile.params
    assert rows["up"].output_shape == [1, 4, 32, 24]
    assert [r.name for r in profile.top(2)] == sorted(expected, key=expected.get, reverse=True)[:2]


def test_peak_activation_memory_follows_tensor_lifetimes():
    # Sequential drops each intermediate once the next layer has used it: at the last ReLU the input (3 ch),
    # the second conv's output (16) and the ReLU's own output (16) are alive; the first conv's (8) is freed.
    h = w = 8
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(inplace=True), nn.Conv2d(8, 16, 1), nn.ReLU())
    assert profile_model(model, (h, w)).peak_activation_bytes == (3 + 16 + 16) * h * w * 4
    # With an in-place ReLU there is no extra buffer: the peak is while the second conv writes its output.
    model[3] = nn.ReLU(inplace=True)
    assert profile_model(model, (h, w)).peak_activation_bytes == (3 + 8 + 16) * h * w * 4


def _export(model: nn.Module, size: tuple[int, int], path) -> None:
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, *size),), str(path), opset_version=17, dynamo=False)


def test_onnx_profile_agrees_with_torch(tmp_path):
    pytest.importorskip("onnx")
    model = Tiny()
    _export(model, (32, 24), tmp_path / "tiny.onnx")
    onnx_profile = profile_onnx(tmp_path / "tiny.onnx")
    assert onnx_profile.macs == count_macs(model, (32, 24))  # every op is Conv/ConvTranspose/Gemm/MatMul here
    assert onnx_profile.imgsz == (32, 24)
    # BN is folded into the stem conv on export: its 8 scale + 8 shift parameters disappear.
    assert onnx_profile.params == count_params(model) - 16
    assert sum(r.macs for r in onnx_profile.layers) == onnx_profile.macs


def test_onnx_profile_agrees_with_torch_on_a_zoo_model(tmp_path):
    pytest.importorskip("onnx")
    from edgedeploy.models import create_model

    model = create_model("mobilenetv1_025")
    with torch.no_grad():  # distinct BN statistics, so no two folded biases are identical (exporters share those)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.bias.normal_(0, 0.1)
    _export(model, (128, 128), tmp_path / "m.onnx")
    onnx_profile = profile_onnx(tmp_path / "m.onnx")
    torch_macs, torch_params = count_macs(model, 128), count_params(model)
    assert abs(onnx_profile.macs - torch_macs) <= 0.01 * torch_macs
    # Every conv here is bias-free and followed by BN: folding drops BN's scale+shift (2C) and adds a conv bias (C).
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert onnx_profile.params == torch_params - bn_channels


def test_onnx_profile_resolves_dynamic_batch_shape_chains(tmp_path):
    """MobileViT's unfold reshapes are traced from `x.shape` (Shape->Gather->Div->Reshape): with a dynamic batch,
    static shape inference loses the attention MatMul shapes, and the onnxruntime probe must recover them."""
    pytest.importorskip("onnxruntime")
    from edgedeploy.models import create_model

    model = create_model("mobilevit_xxs").eval()
    path = tmp_path / "mv.onnx"
    torch.onnx.export(
        model, (torch.zeros(1, 3, 128, 128),), str(path), opset_version=17, dynamo=False,
        input_names=["images"], output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    )  # fmt: skip
    onnx_profile = profile_onnx(path)
    torch_macs = count_macs(model, 128)
    assert not onnx_profile.notes
    assert abs(onnx_profile.macs - torch_macs) <= 0.01 * torch_macs


def test_profile_onnx_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a readable ONNX model"):
        profile_onnx(bad)
    with pytest.raises(InputError, match="not found"):
        profile_onnx(tmp_path / "missing.onnx")


def test_deploy_profile_cli_json(capsys):
    assert main(["profile", "--model", "mobilenetv3_small", "--json", "--top", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "mobilenetv3_small"
    assert report["imgsz"] == [224, 224]
    assert 2.4e6 < report["params"] < 2.7e6 and 50e6 < report["macs"] < 65e6
    assert len(report["layers"]) == 5 and report["peak_activation_bytes"] > 224 * 224 * 3 * 4
    assert report["layers"][0]["macs"] >= report["layers"][-1]["macs"]


def test_deploy_profile_cli_unknown_model_suggests_near_match(capsys):
    assert main(["profile", "--model", "mobilenetv3_smal"]) != 0
    assert "mobilenetv3_small" in capsys.readouterr().err


def test_deploy_profile_cli_bad_size_is_a_clean_error(capsys):
    assert main(["profile", "--model", "mobilevit_xxs", "--imgsz", "224"]) != 0
    assert "multiple of 64" in capsys.readouterr().err


def test_deploy_models_json_uses_the_cache(tmp_path, monkeypatch, capsys):
    import edgedeploy.models.cli as models_cli

    monkeypatch.setenv("EDGEDEPLOY_CACHE_DIR", str(tmp_path))
    assert main(["models", "--task", "segment", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["task"] == "segment" for r in rows)
    assert all(r["params"] > 0 and r["macs"] > 0 for r in rows)
    assert (tmp_path / "model_stats.json").is_file()

    def must_not_count(*_args, **_kwargs):
        raise AssertionError("cached model was recounted")

    monkeypatch.setattr(models_cli, "count_model", must_not_count)
    assert main(["models", "--task", "segment", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == rows


def test_deploy_models_reports_a_model_that_cannot_be_counted(tmp_path, monkeypatch, capsys):
    import edgedeploy.models.cli as models_cli

    monkeypatch.setenv("EDGEDEPLOY_CACHE_DIR", str(tmp_path))

    def broken(name, imgsz=None):
        raise RuntimeError(f"{name} forward failed")

    monkeypatch.setattr(models_cli, "count_model", broken)
    assert main(["models", "--task", "segment", "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert rows and all(r["params"] is None and "forward failed" in r["error"] for r in rows)
    assert "could not count" in captured.err
    assert not (tmp_path / "model_stats.json").exists()  # failures are not cached
