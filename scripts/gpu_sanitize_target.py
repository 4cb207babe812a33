"""A short run of the GPU preprocessing and NMS paths for compute-sanitizer (memcheck / racecheck), launched by
scripts/gpu_check.sh: host and device frames of odd sizes, gray/BGR/BGRA, FP32/FP16, a CUDA graph replay, and
GPU NMS on YOLOX-S-sized candidates. Exits non-zero when a result differs from the CPU reference."""

from __future__ import annotations

import numpy as np
import torch

from edgedeploy.data.preprocess import to_input_tensor
from edgedeploy.runtime import cuda
from edgedeploy.runtime.gpu_preprocess import GpuPreprocessor
from edgedeploy.runtime.nms import batched_detections


def main() -> int:
    rng = np.random.default_rng(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    worst = 0.0
    for hw, dst, layout, fp16 in [((1080, 1920), (640, 640), 3, False), ((333, 517), (320, 416), 1, True),
                                  ((97, 61), (64, 96), 4, False)]:
        shape = (*hw, layout) if layout > 1 else hw
        frame = rng.integers(0, 256, shape, dtype=np.uint8)
        pre = GpuPreprocessor(dst, mean, std, letterbox=True, fp16=fp16)
        dt = np.float16 if fp16 else np.float32
        buf = cuda.DeviceBuffer(3 * dst[0] * dst[1] * np.dtype(dt).itemsize)
        for src in (frame, torch.from_numpy(frame).cuda()):
            pre(src, buf.ptr)
            out = np.empty((1, 3, *dst), dt)
            buf.copy_to_host(out, pre.stream)
            pre.stream.synchronize()
            ref, _, _ = to_input_tensor(frame, dst, mean, std, letterboxed=True)
            s = np.asarray(std, np.float32)[:, None, None]
            worst = max(worst, float(np.abs((out[0].astype(np.float32) - ref[0]) * s * 255).max()))
        graph = cuda.CudaGraph()  # a device frame of our own (no foreign stream to wait for inside the capture)
        dev = cuda.DeviceBuffer(frame.nbytes, frame.shape, np.uint8)
        dev.copy_from_host(frame, pre.stream)
        pre(dev, buf.ptr)
        if not graph.capture(pre.stream, lambda st: pre(dev, buf.ptr)):
            print(f"graph capture failed: {graph.error}")
            return 1
        graph.launch(pre.stream)
        pre.stream.synchronize()
        graph.reset()
        dev.free()
        buf.free()
        pre.close()
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 8400, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + torch.rand(2, 8400, 2, generator=g) * 120 + 8], dim=2)
    scores = torch.rand(2, 8400, 80, generator=g) ** 6
    cpu = batched_detections(boxes, scores)
    gpu = batched_detections(boxes.cuda(), scores.cuda())
    same = all(torch.equal(a[:, 5], b[:, 5].cpu()) and torch.allclose(a, b.cpu(), atol=1e-4) for a, b in zip(cpu, gpu))
    torch.cuda.synchronize()
    print(f"preprocess max diff {worst:.3f}/255; NMS same kept boxes: {same}")
    return 0 if worst <= 1.001 and same else 1


if __name__ == "__main__":
    raise SystemExit(main())
