"""Classify the frames of a video file, an RTSP stream or a camera as they come (``Model.stream``, ``predict --source``).

Frames are read with OpenCV, an optional dependency (``pip install 'edgeconv-runtime[video]'``) imported only here,
only when a stream is opened. OpenCV hands out BGR pixels; they go through the bundle's own preprocessing with
``channel_order="bgr"``, so a frame is classified exactly as the same picture saved to a file would be.
"""
from __future__ import annotations

import math
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from .errors import EdgeconvError
from .prediction import Prediction

VIDEO_INSTALL_HINT = "pip install 'edgeconv-runtime[video]'"
# a network stream that does not answer within this long is an error, not a hang
OPEN_TIMEOUT_MS = 10000
READ_TIMEOUT_MS = 10000
_CSI = re.compile(r"csi://(\d+)$")
_V4L2 = re.compile(r"/dev/video(\d+)$")
_NETWORK = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")
# A source that ends short of the frame count its container declares is truncated or damaged. Counts of containers
# without a frame index (MKV, WebM) are OpenCV's estimate (duration x fps), which can be a frame or so off: a
# shortfall is an error beyond this slack.
FRAME_COUNT_SLACK = (2, 0.005)  # frames, and a fraction of the declared count: the larger of the two


class SourceEndedEarly(EdgeconvError):
    """The source stopped giving frames before its end: a truncated or damaged file, or a stream that stalled. Raised
    by the iteration after every frame read has been classified and yielded; ``summary()["problem"]`` says it too."""


def import_cv2():
    """OpenCV, or a one-line error naming the extra to install."""
    # FFmpeg and OpenCV print their own warnings for a source they cannot open; ours is the one line that counts.
    # setdefault: a user who asks for FFmpeg's messages still gets them.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    try:
        import cv2
    except ImportError as exc:
        raise EdgeconvError(f"video sources need OpenCV, which is not installed: {VIDEO_INSTALL_HINT}") from exc
    return cv2


def csi_pipeline(sensor_id: int, width: int = 1280, height: int = 720, fps: int = 30) -> str:
    """The usual GStreamer pipeline for a Jetson CSI camera (Argus), ending in BGR frames for OpenCV's appsink."""
    return (f"nvarguscamerasrc sensor-id={sensor_id} ! "
            f"video/x-raw(memory:NVMM), width=(int){width}, height=(int){height}, format=(string)NV12, framerate=(fraction){fps}/1 ! "
            "nvvidconv ! video/x-raw, format=(string)BGRx ! videoconvert ! video/x-raw, format=(string)BGR ! "
            "appsink drop=true max-buffers=1")


def open_capture(source):
    """An opened ``cv2.VideoCapture`` for a video file, ``rtsp://...``, ``/dev/videoN`` or ``csi://N``; one-line errors otherwise."""
    cv2 = import_cv2()
    src = str(source)
    csi = _CSI.match(src)
    v4l2 = _V4L2.match(src)
    if csi:
        has = getattr(getattr(cv2, "videoio_registry", None), "hasBackend", None)
        if has is not None and not has(cv2.CAP_GSTREAMER):
            raise EdgeconvError(f"{src} needs OpenCV built with GStreamer (JetPack's python3-opencv); this cv2 has none: "
                                "pip uninstall opencv-python-headless opencv-python so JetPack's is used")
        cap = cv2.VideoCapture(csi_pipeline(int(csi.group(1))), cv2.CAP_GSTREAMER)
        hint = "is the camera connected and nvargus-daemon running?"
    elif v4l2:
        if not Path(src).exists():
            raise EdgeconvError(f"camera not found: {src}; `ls /dev/video*` lists the cameras here")
        cap = cv2.VideoCapture(int(v4l2.group(1)), cv2.CAP_V4L2)
        hint = "is another program using it, and may this user read it (group video)?"
    elif src.lower().startswith(_NETWORK):
        params = [getattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC", None), OPEN_TIMEOUT_MS, getattr(cv2, "CAP_PROP_READ_TIMEOUT_MSEC", None),
                  READ_TIMEOUT_MS]
        try:
            if params[0] is None or params[2] is None:
                raise TypeError("no timeout properties in this OpenCV")
            cap = cv2.VideoCapture(src, cv2.CAP_FFMPEG, params)
        except (TypeError, cv2.error):  # OpenCV < 4.5.2 takes no open parameters
            cap = cv2.VideoCapture(src)
        hint = "check the URL, the credentials and that the server is reachable"
    else:
        path = Path(src)
        if not path.exists():
            raise EdgeconvError(f"video not found: {src}; pass a video file, rtsp://..., /dev/videoN or csi://N")
        if path.is_dir():
            raise EdgeconvError(f"{src} is a folder; --source takes a video file (give image files as arguments instead)")
        cap = cv2.VideoCapture(src)
        hint = "is it a complete video file (mp4, avi, mkv, ...)?"
    if not cap.isOpened():
        cap.release()
        raise EdgeconvError(f"cannot open video source {src}: {hint}")
    return cap


@dataclass
class FramePrediction(Prediction):
    """Top-k for one frame: its index in the source, its time, and how long it took from capture to answer."""

    frame: int = 0
    timestamp_ms: float = 0.0
    latency_ms: float = 0.0

    def to_dict(self) -> dict:
        return {"frame": self.frame, "timestamp_ms": round(self.timestamp_ms, 3), "latency_ms": round(self.latency_ms, 3),
                **super().to_dict()}


def _percentiles(ms: List[float]) -> dict:
    if not ms:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(ms, dtype=np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


class PredictionStream:
    """Iterate to get one ``FramePrediction`` per classified frame; ``summary()`` at any time, also after Ctrl-C.

    ``every=N`` classifies every N-th frame of the source (the others are grabbed, not converted), ``max_frames``
    stops after that many classified frames, ``batch`` runs that many frames per inference (more frames per
    second, more latency: a frame waits for its batch). ``latency_ms`` is capture to answer, that wait included.
    ``timestamp_ms`` is the source's own clock (container time for files and streams, driver time for cameras)
    counted from the first frame read, or the wall clock where the source has none.
    """

    def __init__(self, model, source, every: int = 1, max_frames: Optional[int] = None, batch: int = 1, top_k: int = 5) -> None:
        for name, value in (("every", every), ("batch", batch), ("max_frames", 1 if max_frames is None else max_frames)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise EdgeconvError(f"{name} must be a whole number >= 1, got {value!r}")
        self.model = model
        self.source = str(source)
        self.every, self.max_frames, self.batch, self.top_k = int(every), max_frames, int(batch), top_k
        self._cv2 = import_cv2()
        self._cap = open_capture(source)
        fps = float(self._cap.get(self._cv2.CAP_PROP_FPS) or 0.0)
        self.source_fps = fps if math.isfinite(fps) and fps > 0 else None
        self.frames_read = 0
        self.latencies_ms: List[float] = []
        self.infer_ms: List[float] = []
        self.interrupted = False
        self.problem: Optional[str] = None  # why the source ended early (truncated, stalled), or None
        count = float(self._cap.get(self._cv2.CAP_PROP_FRAME_COUNT) or 0.0)
        self.frame_count = int(count) if math.isfinite(count) and 0 < count < 2**53 else None  # None: live or unknown
        self._stop = False
        self._t_begin: Optional[float] = None
        self._t_end: Optional[float] = None
        self._raw0 = self._raw_prev = self._t_first = None
        self._source_clock: Optional[bool] = None

    # ------------------------------------------------------------------ reading
    def _timestamp(self, t_capture: float) -> float:
        raw = float(self._cap.get(self._cv2.CAP_PROP_POS_MSEC))
        if self._raw_prev is None:
            self._raw0, self._raw_prev, self._t_first = raw, raw, t_capture
            return 0.0
        if self._source_clock is None:  # decided once, on the second frame read: does the source's clock advance?
            self._source_clock = math.isfinite(raw) and raw > self._raw_prev
        self._raw_prev = raw
        return raw - self._raw0 if self._source_clock else (t_capture - self._t_first) * 1000.0

    def _ended_early(self, t_read: float) -> Optional[str]:
        """Why the source gave no more frames (the failed read began at ``t_read``), when that is not its normal end;
        None for the end of a complete video."""
        if self._stop:  # Ctrl-C or stop() while a read was waiting
            return None
        waited = time.perf_counter() - t_read
        if self.source.lower().startswith(_NETWORK) and waited >= 0.8 * READ_TIMEOUT_MS / 1000.0:
            return (f"{self.source} stalled: no frame for {waited:.0f} s after frame {self.frames_read - 1}; check the camera or server "
                    f"and the network, then run again")
        declared = self.frame_count
        if declared is not None and declared - self.frames_read > max(FRAME_COUNT_SLACK[0], FRAME_COUNT_SLACK[1] * declared):
            return (f"{self.source} ended after {self.frames_read} of the {declared} frames its container declares: the video is "
                    f"truncated or damaged (an interrupted copy or recording?); copy or record it again")
        return None

    def _frames(self) -> Iterator[tuple]:
        """(index, timestamp ms, capture time, BGR frame) of every ``every``-th frame until the source ends or stop();
        a source that ends early (truncated, stalled) sets ``problem``."""
        index = -1
        taken = 0
        while not self._stop and (self.max_frames is None or taken < self.max_frames):
            index += 1
            t_read = time.perf_counter()
            if index % self.every:
                if not self._cap.grab():
                    self.problem = self._ended_early(t_read)
                    return
                self.frames_read += 1
                continue
            ok, frame = self._cap.read()
            if not ok or frame is None:
                if index == 0:
                    raise EdgeconvError(f"no frames could be read from {self.source}; is it a complete video file or a live source?")
                self.problem = self._ended_early(t_read)
                return
            t = time.perf_counter()
            self.frames_read += 1
            taken += 1
            yield index, self._timestamp(t), t, frame

    def _classify(self, pending: list) -> List[FramePrediction]:
        t0 = time.perf_counter()
        preds = self.model.predict([f for _, _, _, f in pending], top_k=self.top_k, batch_size=len(pending), channel_order="bgr")
        t1 = time.perf_counter()
        self.infer_ms.append((t1 - t0) * 1000.0)
        out = []
        for (index, ts, t_capture, _), p in zip(pending, preds):
            latency = (t1 - t_capture) * 1000.0
            self.latencies_ms.append(latency)
            out.append(FramePrediction(p.labels, p.probabilities, p.indices, None, frame=index, timestamp_ms=ts, latency_ms=latency))
        self._t_end = t1
        return out

    def __iter__(self) -> Iterator[FramePrediction]:
        if self._cap is None:
            raise EdgeconvError("this stream is closed; open a new one with Model.stream(source)")
        self._t_begin = self._t_begin or time.perf_counter()
        pending: list = []
        try:
            for item in self._frames():
                pending.append(item)
                if len(pending) >= self.batch:
                    batch, pending = pending, []
                    yield from self._classify(batch)
            if pending:
                yield from self._classify(pending)
            if self.problem:  # every frame read has been classified and handed out: now say why there are no more
                self._t_end = self._t_end or time.perf_counter()
                raise SourceEndedEarly(self.problem)
        except KeyboardInterrupt:
            self.interrupted = True
            raise
        finally:
            self._t_end = self._t_end or time.perf_counter()

    def stop(self) -> None:
        """End the iteration after the batch being read (safe from a signal handler)."""
        self._stop = True

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self) -> "PredictionStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ results
    def summary(self) -> dict:
        """Frames classified and read, frames per second (classified / wall time), latency percentiles in ms."""
        n = len(self.latencies_ms)
        seconds = (self._t_end - self._t_begin) if self._t_begin and self._t_end else 0.0
        return {"source": self.source, "frames": n, "frames_read": self.frames_read, "seconds": seconds,
                "fps": n / seconds if seconds > 0 else None, "latency_ms": _percentiles(self.latencies_ms),
                "inference_ms_mean": float(np.mean(self.infer_ms)) if self.infer_ms else None,
                "source_fps": self.source_fps, "clock": "wall" if self._source_clock is False else "source",
                "every": self.every, "batch": self.batch, "max_frames": self.max_frames,
                "backend": self.model.backend_name, "precision": self.model.precision, "interrupted": self.interrupted,
                "frame_count": self.frame_count, "problem": self.problem}


class stop_on_sigint:
    """While active, Ctrl-C (SIGINT) ends ``stream`` cleanly after the current batch; a second one raises KeyboardInterrupt.

    Installed explicitly, so that it works also where SIGINT was inherited as ignored (a program started with
    ``&`` from a script, or by some supervisors), which Python otherwise leaves ignored. Main thread only.
    """

    def __init__(self, stream: PredictionStream) -> None:
        self.stream = stream
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.stream._stop:
            raise KeyboardInterrupt
        self.stream.interrupted = True
        self.stream.stop()

    def __enter__(self) -> "stop_on_sigint":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def format_frame(p: FramePrediction) -> str:
    tops = "  ".join(f"{l} {pr:.4f}" for l, pr in zip(p.labels, p.probabilities))
    return f"{p.frame:>8} {p.timestamp_ms:>11.1f} {p.latency_ms:>11.2f}  {tops}"


FRAME_HEADER = f"{'frame':>8} {'time ms':>11} {'latency ms':>11}  top-k"


def format_summary(s: dict) -> str:
    lat = s["latency_ms"]
    fps = f"{s['fps']:.1f} frames/s" if s["fps"] else "- frames/s"
    figures = "" if lat["p50"] is None else f"; latency ms p50 {lat['p50']:.2f} p90 {lat['p90']:.2f} p99 {lat['p99']:.2f} max {lat['max']:.2f}"
    end = ", interrupted" if s["interrupted"] else ", ended early" if s.get("problem") else ""
    return (f"{s['frames']} frames classified ({s['frames_read']} read) in {s['seconds']:.2f} s: {fps}{figures} "
            f"[{s['backend']} {s['precision']}, batch {s['batch']}, every {s['every']}{end}]")
