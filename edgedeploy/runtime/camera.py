"""Camera / video / RTSP application: capture, inference and drawing on separate threads with bounded queues.

    capture thread --(in queue)--> inference thread --(out queue)--> main thread: draw, show, save

* Live sources (camera index, rtsp/http URL): the in-queue keeps only the newest frames -- when inference is
  slower than the camera, old frames are dropped instead of piling up latency and memory.
* Files: every frame is processed (the capture thread waits instead of dropping).
* A live source that drops is reopened (`reconnect_attempts` times, `reconnect_delay_s` apart).
* Ctrl-C (KeyboardInterrupt in the main thread) stops all threads, closes the output file and returns a summary.
Drawing stays on the main thread because GUI toolkits (cv2.imshow) require it.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgedeploy.errors import EdgeDeployError, SourceError

WINDOW = "edgedeploy"


class QueueClosed(Exception):
    """Raised by `get` once the queue is closed and drained."""


class FrameQueue:
    """A bounded queue. With `drop_oldest` (newest frame wins) `put` never blocks: a full queue drops its oldest
    item and counts it. Without it, `put` waits for space (backpressure) until the queue is closed."""

    def __init__(self, maxsize: int = 1, drop_oldest: bool = True) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize, self.drop_oldest = maxsize, drop_oldest
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0

    def put(self, item: Any, timeout: float | None = None) -> bool:
        """Add `item`; returns False if the queue was closed (the item is discarded)."""
        with self._cond:
            if self.drop_oldest:
                while len(self._items) >= self.maxsize:
                    self._items.popleft()
                    self.dropped += 1
            else:
                deadline = None if timeout is None else time.monotonic() + timeout
                while len(self._items) >= self.maxsize and not self._closed:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError("queue full")
                    self._cond.wait(remaining if remaining is not None else 0.1)
            if self._closed:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> Any:
        """Oldest item; waits for one. Raises QueueClosed when closed and empty, TimeoutError on timeout."""
        with self._cond:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._items:
                if self._closed:
                    raise QueueClosed
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("queue empty")
                self._cond.wait(remaining if remaining is not None else 0.1)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """No more puts; getters drain what is left, then get QueueClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


# ---- sources ----------------------------------------------------------------------------------------------------
def is_live(source: str | int) -> bool:
    s = str(source)
    return s.isdigit() or "://" in s


def open_source(source: str | int):
    """cv2.VideoCapture for a camera index ('0'), a URL (rtsp://, http://) or a video file; SourceError if not."""
    import cv2

    s = str(source)
    if s.isdigit():
        cap = cv2.VideoCapture(int(s))
        if not cap.isOpened():
            raise SourceError(f"camera {s} could not be opened: is it connected, and is /dev/video{s} readable?")
        return cap
    if "://" not in s and not Path(s).exists():
        raise SourceError(f"video source {s!r} does not exist (give a file path, a camera index or an rtsp:// URL)")
    cap = cv2.VideoCapture(s)
    if not cap.isOpened():
        raise SourceError(f"could not open video source {s!r}: unreachable stream or unsupported format/codec")
    return cap


# ---- drawing ------------------------------------------------------------------------------------------------------
def _color(i: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(i * 7919 + 1)
    return tuple(int(c) for c in rng.integers(64, 256, 3))


def draw_result(frame: np.ndarray, result: Any) -> np.ndarray:
    """Boxes and labels for Detections, top-1 for Classification, a blended mask for Segmentation."""
    import cv2

    from edgedeploy.runtime.pipelines import Classification, Detections, Segmentation

    if isinstance(result, Detections):
        for box, score, label, cls in zip(result.boxes, result.scores, result.labels(), result.classes):
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            col = _color(int(cls))
            cv2.rectangle(frame, (x1, y1), (x2, y2), col, 2)
            cv2.putText(frame, f"{label} {score:.2f}", (x1, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, col, 1)
    elif isinstance(result, Classification):
        cv2.putText(frame, f"{result.name} {result.score:.2f}", (8, 44), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 255, 255), 2)
    elif isinstance(result, Segmentation):
        palette = np.array([_color(i) for i in range(int(result.mask.max()) + 1)], np.uint8)
        frame[:] = cv2.addWeighted(frame, 0.6, palette[result.mask], 0.4, 0)
    return frame


def draw_overlay(frame: np.ndarray, fps: float, latency_ms: float) -> None:
    import cv2

    text = f"{fps:5.1f} FPS  {latency_ms:6.1f} ms"
    cv2.putText(frame, text, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 3)
    cv2.putText(frame, text, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1)


def _open_window() -> None:
    import cv2

    try:
        cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
    except cv2.error as e:
        raise EdgeDeployError(
            "--show needs a display and an OpenCV build with GUI support (opencv-python, not "
            f"opencv-python-headless); use --save out.mp4 on a headless machine. OpenCV said: {str(e).strip()[:200]}"
        ) from e


# ---- the app ------------------------------------------------------------------------------------------------------
@dataclass
class RunSummary:
    source: str
    end_reason: str = ""
    frames_read: int = 0
    frames_inferred: int = 0
    frames_dropped: int = 0
    frames_written: int = 0
    reconnects: int = 0
    wall_s: float = 0.0
    # bounded, so a camera left running for days keeps flat memory: percentiles cover the last 10,000 frames
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000), repr=False)
    error: str = ""
    output: str = ""

    @property
    def fps(self) -> float:
        return self.frames_inferred / self.wall_s if self.wall_s > 0 else 0.0

    def latency(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies_ms), q)) if self.latencies_ms else float("nan")

    def format(self) -> str:
        lines = [
            f"source      {self.source} ({self.end_reason})",
            f"frames      read {self.frames_read}, inferred {self.frames_inferred}, dropped {self.frames_dropped}, "
            f"written {self.frames_written}",
            f"throughput  {self.fps:.1f} FPS over {self.wall_s:.2f} s",
            f"latency     median {self.latency(50):.1f} ms, p90 {self.latency(90):.1f} ms, max {self.latency(100):.1f} ms"
            " (pre + inference + post)",
        ]
        if self.reconnects:
            lines.append(f"reconnects  {self.reconnects}")
        if self.output:
            lines.append(f"saved       {self.output}")
        if self.error:
            lines.append(f"error       {self.error}")
        return "\n".join(lines)


_END = object()


class CameraApp:
    """Run `pipeline` (a Classifier/Detector/Segmenter, or any callable frame -> result) on a video source."""

    def __init__(
        self,
        pipeline: Callable[[np.ndarray], Any],
        source: str | int,
        *,
        show: bool = False,
        save: str | os.PathLike | None = None,
        max_frames: int | None = None,
        drop_frames: bool | None = None,
        queue_size: int = 2,
        reconnect_attempts: int = 5,
        reconnect_delay_s: float = 1.0,
        on_result: Callable[[int, np.ndarray, Any], None] | None = None,
    ) -> None:
        self.pipeline, self.source = pipeline, str(source)
        self.show, self.save = show, Path(save) if save else None
        self.max_frames = max_frames
        self.live = is_live(source)
        drop = self.live if drop_frames is None else drop_frames
        self.in_q = FrameQueue(queue_size, drop_oldest=drop)
        self.out_q = FrameQueue(queue_size, drop_oldest=False)
        self.reconnect_attempts, self.reconnect_delay_s = reconnect_attempts, reconnect_delay_s
        self.on_result = on_result
        self._stop = threading.Event()
        self.summary = RunSummary(self.source)
        self._errors: list[BaseException] = []
        if show:
            _open_window()
        self.cap = open_source(source)  # fail fast, before any thread starts
        fps = self.cap.get(5)  # cv2.CAP_PROP_FPS: 0 or NaN for many cameras and streams
        self.src_fps = float(fps) if fps and 0 < fps < 1000 else 30.0

    def stop(self) -> None:
        self._stop.set()

    # ---- threads ---------------------------------------------------------------------------------------------------
    def _reconnect(self) -> bool:
        for attempt in range(1, self.reconnect_attempts + 1):
            if self._stop.wait(self.reconnect_delay_s):
                return False
            try:
                self.cap.release()
                self.cap = open_source(self.source)
                self.summary.reconnects += 1
                return True
            except SourceError as e:
                self.summary.error = f"reconnect {attempt}/{self.reconnect_attempts}: {e}"
        return False

    def _capture_loop(self) -> None:
        try:
            while not self._stop.is_set():
                if self.max_frames is not None and self.summary.frames_read >= self.max_frames:
                    self.summary.end_reason = self.summary.end_reason or "max frames"
                    break
                ok, frame = self.cap.read()
                if not ok or frame is None:
                    if self.live and self._reconnect():
                        continue
                    if self.live:
                        self.summary.end_reason = "source lost"
                        self.summary.error = self.summary.error or f"{self.source} dropped and did not come back"
                    else:
                        self.summary.end_reason = "source ended"
                    break
                self.summary.frames_read += 1
                if not self.in_q.put((self.summary.frames_read - 1, time.perf_counter(), frame)):
                    break
        except BaseException as e:  # surfaced by run(), never swallowed
            self._errors.append(e)
        finally:
            self.in_q.close()

    def _infer_loop(self) -> None:
        try:
            while True:
                try:
                    idx, t_cap, frame = self.in_q.get()
                except QueueClosed:
                    break
                t0 = time.perf_counter()
                result = self.pipeline(frame)
                self.summary.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                self.summary.frames_inferred += 1
                if not self.out_q.put((idx, frame, result)):
                    break
        except BaseException as e:
            self._errors.append(e)
            self._stop.set()
        finally:
            self.out_q.close()

    # ---- main thread ------------------------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        import cv2

        t_start = time.perf_counter()
        threads = [threading.Thread(target=self._capture_loop, name="capture", daemon=True),
                   threading.Thread(target=self._infer_loop, name="inference", daemon=True)]
        for t in threads:
            t.start()
        writer, tmp_out = None, None
        fps_ema, last_t = 0.0, None
        try:
            while True:
                try:
                    idx, frame, result = self.out_q.get(timeout=0.5)
                except TimeoutError:
                    continue
                except QueueClosed:
                    break
                now = time.perf_counter()
                if last_t is not None:
                    inst = 1.0 / max(now - last_t, 1e-6)
                    fps_ema = inst if fps_ema == 0 else 0.9 * fps_ema + 0.1 * inst
                last_t = now
                if self.on_result is not None:
                    self.on_result(idx, frame, result)
                if self.show or self.save:
                    draw_result(frame, result)
                    draw_overlay(frame, fps_ema, self.summary.latencies_ms[-1] if self.summary.latencies_ms else 0.0)
                if self.save:
                    if writer is None:
                        writer, tmp_out = self._open_writer(frame)
                    writer.write(frame)
                    self.summary.frames_written += 1
                if self.show:
                    cv2.imshow(WINDOW, frame)
                    if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                        self.summary.end_reason = "closed by user"
                        break
        except KeyboardInterrupt:
            self.summary.end_reason = "interrupted"
        finally:
            self._stop.set()
            self.in_q.close()
            self.out_q.close()
            for t in threads:
                t.join(timeout=10)
            self.cap.release()
            if writer is not None:
                writer.release()
                if self._errors or tmp_out is None:
                    Path(tmp_out).unlink(missing_ok=True)
                else:
                    os.replace(tmp_out, self.save)  # the output appears complete or not at all
                    self.summary.output = str(self.save)
            if self.show:
                cv2.destroyAllWindows()
            self.summary.frames_dropped = self.in_q.dropped
            self.summary.wall_s = time.perf_counter() - t_start
        if self._errors:
            raise self._errors[0]
        return self.summary

    def _open_writer(self, frame: np.ndarray):
        import cv2

        assert self.save is not None
        self.save.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.save.with_name(f".{self.save.stem}.partial{self.save.suffix}")
        fourcc = cv2.VideoWriter_fourcc(*("mp4v" if self.save.suffix.lower() in (".mp4", ".m4v", ".mov") else "MJPG"))
        writer = cv2.VideoWriter(str(tmp), fourcc, float(self.src_fps), (frame.shape[1], frame.shape[0]))
        if not writer.isOpened():
            raise SourceError(f"could not open {self.save} for writing (unsupported extension/codec? try .mp4 or .avi)")
        return writer, tmp
