"""The parity proof proves: seeded re-initialised weights whose outputs depend on the input, a refusal when they
do not, the strict FP32 tolerance, and `deploy verify` catching one corrupted weight tensor in each family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgedeploy.cli import main
from edgedeploy.errors import EXIT_ENGINE_SKIPPED, EXIT_ERROR, EXIT_PARITY_FAILED, InsensitiveProofError
from edgedeploy.export import export
from edgedeploy.export.parity import ParityResult, check_spread, output_spread
from edgedeploy.export.weights import reinitialise_for_parity

IMGSZ = 64
FAMILIES = ["mobilenetv3_small", "shufflenetv2_x0_5", "efficientnet_b0", "mobilevit_xxs", "lraspp_mobilenetv3_small",
            "yolov5n", "yolox_nano"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _export(name: str, out: Path, **kw):
    return export(name, imgsz=kw.pop("imgsz", IMGSZ), out=str(out), builder="none", progress=False, **kw)


def _corrupt_one_weight(path: Path, factor: float = 1.01) -> str:
    """Scale one weight tensor (the middle Conv's) by `factor`, in place; returns the node's name."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits]
    node = convs[len(convs) // 2]
    t = inits[node.input[1]]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
    onnx.save(model, str(path))
    return node.name


def _legacy_reinit(model, sample, seed=0, target_std=2.0):
    """The re-initialisation this project used before (random BatchNorm statistics, last layer scaled to logit
    std 2): MobileNetV3's logits then hardly depend on the input."""
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(sample)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) * 0.8 + 0.6)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
        last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
        scale = target_std / float(model(x).std())
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return {"method": "legacy"}


def test_same_seed_gives_identical_weights_and_onnx_outputs(tmp_path):
    """Weights come from --seed alone (not the global RNG): two exports with one seed give bit-identical ONNX
    weights and outputs; another seed gives others."""
    from edgedeploy.export.parity import engine_runner, onnx_engine

    inits = {}
    for run, (seed, global_seed) in enumerate([(3, 0), (3, 1), (4, 0)]):
        torch.manual_seed(global_seed)  # whatever the global RNG did before must not matter
        _export("mobilenetv3_small", tmp_path / str(run), seed=seed)
        path = tmp_path / str(run) / "mobilenetv3_small" / "mobilenetv3_small.onnx"
        inits[run] = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
        inits[run]["__out__"] = engine_runner(onnx_engine(path))(np.random.default_rng(7).random((1, 3, IMGSZ, IMGSZ), np.float32))[0]
    assert inits[0].keys() == inits[1].keys()
    assert all(np.array_equal(inits[0][k], inits[1][k]) for k in inits[0])
    assert not np.array_equal(inits[0]["__out__"], inits[2]["__out__"])


def test_reinit_is_deterministic_for_detectors():
    from edgedeploy.export.options import ExportOptions
    from edgedeploy.export.tasks.detect import DetectAdapter
    from edgedeploy.models import create_model

    adapter = DetectAdapter()
    sample = np.random.default_rng(0).random((2, 3, IMGSZ, IMGSZ), dtype=np.float32)
    states = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        module = adapter.wrap_for_export(create_model("yolox_nano", num_classes=3), ExportOptions("yolox_nano"))
        adapter.reinitialise_for_parity(module, sample, seed=5)
        states.append(module.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_mobilenetv3_large_no_weights_proof_has_spread_and_says_random(tmp_path):
    lines: list[str] = []
    report = export("mobilenetv3_large", out=str(tmp_path), builder="none", progress=False, log=lines.append)
    assert lines[0].startswith("random weights: parity proof only")
    for name in ("parity_raw", "parity_simplified"):
        d = report.step(name).details
        assert d["passed"] and (d["rtol"], d["atol"]) == (1e-3, 1e-5)  # the classic recipe's tolerance
        assert d["min_spread"] >= 100 * d["atol"], d["table"]
        print(name, report.step(name).figure)  # quoted in docs/EXPORT.md
    side = json.loads((tmp_path / "mobilenetv3_large" / "mobilenetv3_large.onnx.json").read_text())
    assert side["provenance"]["random_weights"] is True and side["provenance"]["seed"] == 0


def test_spread_check_refuses_an_input_insensitive_network(tmp_path, monkeypatch):
    """The old re-initialisation gave logits that move < atol across inputs: the proof now refuses it (exit 4)
    instead of calling it parity-proved."""
    import edgedeploy.export.weights as weights

    monkeypatch.setattr(weights, "reinitialise_for_parity", _legacy_reinit)
    with pytest.raises(InsensitiveProofError) as e:
        _export("mobilenetv3_large", tmp_path, imgsz=224)
    assert "hardly depend on the input" in str(e.value) and e.value.exit_code == EXIT_PARITY_FAILED
    report = json.loads((tmp_path / "mobilenetv3_large" / "export_report.json").read_text())
    parity = next(s for s in report["steps"] if s["name"] == "parity_raw")
    assert parity["status"] == "failed" and parity["details"]["min_spread"] < 100 * 1e-5


def test_check_spread_on_constant_and_moving_outputs():
    rng = np.random.default_rng(0)
    moving = rng.standard_normal((4, 10)).astype(np.float32)
    flat = np.ones((4, 10), np.float32) * 5 + rng.standard_normal((1, 10)).astype(np.float32) * 1e-7
    assert output_spread(moving) > 0.5 and output_spread(flat) < 1e-6
    result = ParityResult(True, 1e-3, 1e-5)
    assert check_spread(result, ["a", "b"], [moving, flat], 1e-5) == [
        f"b (spread {output_spread(flat):.3g} < 100 x atol 1e-05)"]
    ints = [np.zeros((4, 3), np.int32)]
    assert check_spread(ParityResult(True, 1e-3, 1e-5), ["mask"], ints, 1e-5)  # identical class ids: refused


def test_reinit_outputs_depend_on_input():
    from edgedeploy.models import create_model

    model = create_model("mobilenetv3_small").eval()
    sample = np.random.default_rng(0).random((16, 3, IMGSZ, IMGSZ), dtype=np.float32)
    figures = reinitialise_for_parity(model, sample, seed=0)
    assert figures["output_spread_before"] < 1e-3  # the constructor's weights: the vacuous proof
    assert figures["output_spread_after"] >= 100 * 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify")
    with torch.no_grad():
        torch.set_num_threads(1)
        for name in FAMILIES:
            export(name, imgsz=IMGSZ, out=str(out), builder="none", progress=False)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_verify_passes_and_catches_one_corrupted_weight(exported, tmp_path, name, capsys):
    src = exported / name
    work = tmp_path / name
    shutil.copytree(src, work)
    path = work / f"{name}.onnx"
    assert main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("random weights: parity proof only") and "verified: max_abs" in out
    node = _corrupt_one_weight(path, 1.01)
    assert main(["verify", str(path)]) == EXIT_PARITY_FAILED, node
    captured = capsys.readouterr()
    assert "disagrees with PyTorch" in captured.err and "Traceback" not in captured.err
    assert "changed since export" in captured.out


def test_verify_bad_inputs(exported, tmp_path, capsys):
    name = "mobilenetv3_small"
    src = exported / name / f"{name}.onnx"

    lone = tmp_path / "lone.onnx"  # no sidecar
    shutil.copy(src, lone)
    assert main(["verify", str(lone)]) == EXIT_ERROR
    assert "no sidecar lone.onnx.json" in capsys.readouterr().err

    cut = tmp_path / f"{name}.onnx"  # truncated, with its sidecar
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    shutil.copy(str(src) + ".json", str(cut) + ".json")
    assert main(["verify", str(cut)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "not a readable ONNX model" in err and "Traceback" not in err

    from edgedeploy.models import create_model

    other = tmp_path / "other.pt"  # a checkpoint of another model, with and without its name in meta
    torch.save({"model": create_model("shufflenetv2_x0_5").state_dict(), "meta": {"model_name": "shufflenetv2_x0_5"}},
               other)
    assert main(["verify", str(src), "--weights", str(other)]) == EXIT_ERROR
    assert "checkpoint of shufflenetv2_x0_5, but the artifact is mobilenetv3_small" in capsys.readouterr().err
    torch.save(create_model("shufflenetv2_x0_5").state_dict(), other)
    assert main(["verify", str(src), "--weights", str(other)]) == EXIT_ERROR
    assert "Traceback" not in capsys.readouterr().err

    engine = tmp_path / f"{name}.fp32.engine"  # an engine, and no TensorRT runtime on this machine
    engine.write_bytes(b"not really an engine")
    shutil.copy(str(src) + ".json", str(engine) + ".json")
    if not torch.cuda.is_available():
        assert main(["verify", str(engine)]) == EXIT_ENGINE_SKIPPED
        assert "no runtime for this engine here" in capsys.readouterr().err

    assert main(["verify", str(tmp_path / "missing.onnx")]) == EXIT_ERROR


def test_verify_fp16_and_raw_onnx(tmp_path, capsys):
    """An FP16 ONNX is judged as at export (agreement with PyTorch, figures recorded); the raw export is proved
    with the simplified one's sidecar."""
    export("mobilenetv3_small", imgsz=IMGSZ, out=str(tmp_path), builder="none", progress=False, fp16=True,
           eval_images=4)
    folder = tmp_path / "mobilenetv3_small"
    assert main(["verify", str(folder / "mobilenetv3_small.fp16.onnx")]) == 0
    assert "fp16: agreement with PyTorch 1.000" in capsys.readouterr().out
    assert main(["verify", str(folder / "mobilenetv3_small.raw.onnx"), "--report", str(tmp_path / "v.json")]) == 0
    res = json.loads((tmp_path / "v.json").read_text())
    assert res["passed"] and res["parity"]["min_spread"] >= 100 * 1e-5
    assert not [n for n in res["notes"] if "changed since export" in n]  # the raw ONNX has no sha256 of its own
