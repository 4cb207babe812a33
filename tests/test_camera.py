"""Camera application, headless: an mp4 written by OpenCV with a moving square drives `deploy run` end to end."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from edgedeploy.cli import main
from edgedeploy.errors import SourceError
from edgedeploy.runtime import Detector
from edgedeploy.runtime import camera as camera_mod
from edgedeploy.runtime.camera import CameraApp, FrameQueue, QueueClosed, open_source
from test_runtime_models import frame_with_square, make_detector_onnx

N_FRAMES, H, W = 24, 120, 160


def square_at(i: int) -> tuple[int, int, int, int]:
    x = 10 + 4 * i
    return (x, 30, x + 40, 80)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("camera") / "moving.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (W, H))
    assert writer.isOpened()
    for i in range(N_FRAMES):
        writer.write(frame_with_square(H, W, square_at(i)))
    writer.release()
    return path


@pytest.fixture(scope="module")
def detector_onnx(tmp_path_factory):
    return make_detector_onnx(tmp_path_factory.mktemp("camera_model"))


# ---- queue semantics ------------------------------------------------------------------------------------------------
def test_newest_frame_wins_queue_drops_oldest():
    q = FrameQueue(maxsize=2, drop_oldest=True)
    for i in range(5):
        assert q.put(i)
    assert q.dropped == 3 and len(q) == 2
    assert [q.get(timeout=1), q.get(timeout=1)] == [3, 4]
    q.close()
    with pytest.raises(QueueClosed):
        q.get(timeout=1)
    assert q.put(9) is False


def test_blocking_queue_applies_backpressure_until_consumed_or_closed():
    q = FrameQueue(maxsize=1, drop_oldest=False)
    q.put("a")
    with pytest.raises(TimeoutError):
        q.put("b", timeout=0.05)
    t = threading.Timer(0.05, q.get)
    t.start()
    assert q.put("c", timeout=2) is True  # unblocked once the consumer took "a"
    t.join()
    threading.Timer(0.05, q.close).start()
    assert q.put("d") is False  # unblocked by close: the item is discarded, nothing hangs
    assert q.get(timeout=1) == "c"


# ---- end to end on a real video file -----------------------------------------------------------------------------------
def test_deploy_run_saves_annotated_video_headless(video, detector_onnx, tmp_path, capsys):
    out = tmp_path / "out" / "annotated.mp4"
    assert main(["run", "--engine", str(detector_onnx), "--source", str(video), "--save", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(source ended)" in printed and f"read {N_FRAMES}, inferred {N_FRAMES}, dropped 0" in printed
    cap = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    assert len(frames) == N_FRAMES and frames[0].shape == (H, W, 3)
    # the drawn box outline (not white, not background) sits on the square's border in the saved frame
    x1, y1, x2, y2 = square_at(5)
    edge = frames[5][y1 - 1 : y2 + 1, x1 - 1].astype(int)
    assert np.abs(edge - 30).max() > 40
    assert not list(out.parent.glob(".*partial*")), "no temporary file left behind"


def test_detections_follow_the_moving_square(video, detector_onnx):
    seen = {}
    app = CameraApp(Detector(detector_onnx), str(video), on_result=lambda i, f, r: seen.__setitem__(i, r))
    summary = app.run()
    assert summary.end_reason == "source ended" and summary.frames_inferred == N_FRAMES
    assert sorted(seen) == list(range(N_FRAMES))
    for i, dets in seen.items():
        assert len(dets) == 1
        np.testing.assert_allclose(dets.boxes[0], square_at(i), atol=160 / 64 + 2)  # mp4 blur + letterbox step
    assert len(summary.latencies_ms) == N_FRAMES and summary.fps > 0


def test_slow_inference_drops_old_frames_but_processes_the_newest(video):
    seen = []

    def slow(frame):
        time.sleep(0.03)
        return None

    app = CameraApp(slow, str(video), drop_frames=True, queue_size=1, on_result=lambda i, f, r: seen.append(i))
    summary = app.run()
    assert summary.frames_read == N_FRAMES
    assert summary.frames_dropped > 0 and summary.frames_inferred == N_FRAMES - summary.frames_dropped
    assert seen[-1] == N_FRAMES - 1  # the newest frame always wins
    assert seen == sorted(seen)


def test_ctrl_c_stops_cleanly_with_summary_and_complete_output(video, tmp_path):
    out = tmp_path / "partial_run.mp4"

    def interrupt(i, frame, result):
        if i == 5:
            raise KeyboardInterrupt

    app = CameraApp(lambda f: None, str(video), save=out, on_result=interrupt)
    summary = app.run()
    assert summary.end_reason == "interrupted"
    assert summary.frames_written == 5 and out.exists()
    assert not [t for t in threading.enumerate() if t.name in ("capture", "inference")]
    assert "interrupted" in summary.format()


# ---- bad sources -------------------------------------------------------------------------------------------------------
def test_missing_source_is_source_error(tmp_path, detector_onnx, capsys):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "nope.mp4")
    assert main(["run", "--engine", str(detector_onnx), "--source", str(tmp_path / "nope.mp4")]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "not_a_video.mp4"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(SourceError, match="could not open"):
        open_source(bad)


class FlakyCapture:
    """A live camera that delivers `frames` frames and then drops (read fails)."""

    def __init__(self, frames: int) -> None:
        self.left = frames

    def read(self):
        if self.left <= 0:
            return False, None
        self.left -= 1
        return True, np.zeros((8, 8, 3), np.uint8)

    def get(self, prop):
        return 25.0

    def release(self):
        pass


def test_live_source_reconnects_then_reports_loss(monkeypatch):
    opened = []

    def fake_open(source):
        opened.append(source)
        if len(opened) > 3:  # comes back twice, then stays down
            raise SourceError("unreachable")
        return FlakyCapture(4)

    monkeypatch.setattr(camera_mod, "open_source", fake_open)
    app = CameraApp(lambda f: None, "rtsp://camera/stream", reconnect_attempts=2, reconnect_delay_s=0.01)
    summary = app.run()
    assert summary.reconnects == 2 and summary.frames_read == 12
    assert summary.end_reason == "source lost" and "unreachable" in summary.error


def test_pipeline_error_is_raised_not_swallowed(video):
    def broken(frame):
        raise RuntimeError("kernel exploded")

    with pytest.raises(RuntimeError, match="kernel exploded"):
        CameraApp(broken, str(video)).run()


# ---- GPU machine targets ---------------------------------------------------------------------------------------------------
def test_camera_pipeline_memory_stays_flat_over_10000_frames(detector_onnx):
    """A camera left running must not grow: RSS (and GPU memory where there is one) flat after warm-up.
    Its throughput against a bare loop is measured by benchmarks/runtime_targets.py, not asserted here."""
    import resource

    det = Detector(detector_onnx)
    frame = frame_with_square(720, 1280, (100, 100, 400, 300))
    n, every = 10_000, 1000

    class Synthetic(FlakyCapture):
        def read(self):
            ok, _ = super().read()
            return ok, frame.copy() if ok else None

    caps = iter([Synthetic(n)])
    rss, gpu, found = [], [], []

    def probe(i, f, r):
        found.append(len(r) == 1)  # every frame is really inferred: the square is found
        if i % every == 0:
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            if torch_cuda():
                import torch

                gpu.append(torch.cuda.memory_allocated())

    orig = camera_mod.open_source
    camera_mod.open_source = lambda s: next(caps)
    try:
        summary = CameraApp(det, "synthetic", drop_frames=False, on_result=probe).run()
    finally:
        camera_mod.open_source = orig
    assert summary.frames_inferred == n and summary.frames_dropped == 0 and sum(found) == n
    assert len(rss) == n // every
    assert rss[-1] - rss[1] < 20 * 1024, rss  # KiB: no growth after warm-up (each 720p frame is 2.6 MiB)
    assert gpu[-1:] == gpu[1:2] or not gpu


def torch_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.slow  # a fresh interpreter importing torch/onnxruntime: ~10-30 s on a loaded 2-core machine
def test_embedding_example_runs_on_the_video(video, detector_onnx, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    example = root / "examples" / "camera_app.py"
    # the package under test, whichever copy of it is installed (a user runs the example after `pip install -e .`)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    assert len(example.read_text().splitlines()) <= 60
    out = tmp_path / "example.mp4"
    proc = subprocess.run([sys.executable, str(example), str(detector_onnx), str(video), "--save", str(out),
                           "--max-frames", "6"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "frame 5: 1 objects, first square at" in proc.stdout and "6 frames" in proc.stdout
    assert cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FRAME_COUNT) == 6


def test_show_without_gui_is_a_clear_error(video):
    from edgedeploy.errors import EdgeDeployError

    try:
        cv2.namedWindow("probe")
        cv2.destroyWindow("probe")
        pytest.skip("this OpenCV build has a GUI and a display")
    except cv2.error:
        pass
    with pytest.raises(EdgeDeployError, match="--show needs a display.*--save"):
        CameraApp(lambda f: None, str(video), show=True)
