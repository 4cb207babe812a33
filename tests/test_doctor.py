import json

from edgedeploy import doctor
from edgedeploy.cli import main


def test_doctor_json_reports_every_probe(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = {c["name"] for c in report["checks"]}
    assert {"python", "torch", "gpu", "onnxruntime", "tensorrt", "tensorrt-rtx", "cuda-python", "opencv"} <= names
    import onnxruntime

    ort = next(c for c in report["checks"] if c["name"] == "onnxruntime")
    assert ort["extra"]["providers"] == onnxruntime.get_available_providers()


def test_missing_tensorrt_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "tensorrt":
            raise ImportError("no tensorrt")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    c = doctor.check_tensorrt()
    assert not c.ok and "pip install tensorrt" in c.fix and "JetPack" in c.fix


def test_a_crashing_probe_becomes_a_line_not_a_crash(monkeypatch):
    def broken():
        raise RuntimeError("driver exploded")

    broken.__name__ = "check_broken_thing"
    monkeypatch.setattr(doctor, "CHECKS", [doctor.check_python, broken])
    checks = doctor.run_checks()
    assert [c.name for c in checks] == ["python", "broken-thing"]
    assert not checks[1].ok and "driver exploded" in checks[1].detail


def test_human_report_lists_capabilities(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "What this machine can do" in out and "export ONNX + parity" in out


def test_cuda_line_says_which_extra_the_driver_needs():
    jetpack6 = doctor.cuda_line_check(12060, "13.5.0", (13, 0))  # CUDA 12.6 driver under the CUDA 13 line
    assert not jetpack6.ok and "edgedeploy[cuda12]" in jetpack6.fix and "CUDA 12.6" in jetpack6.detail
    assert doctor.cuda_line_check(12060, "12.9.4", (12, 9)).ok
    r580 = doctor.cuda_line_check(13000, "13.5.0", (13, 0))
    assert r580.ok and r580.extra["extra"] == "cuda13"
    missing = doctor.cuda_line_check(13000, None, None)
    assert not missing.ok and "edgedeploy[cuda13]" in missing.fix
    no_driver = doctor.cuda_line_check(None, "13.5.0", (13, 0))
    assert not no_driver.ok and "driver" in no_driver.fix and "ONNX Runtime" in no_driver.fix
