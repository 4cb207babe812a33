"""10,000 frames through GPU preprocessing (host frames via pinned staging, and torch CUDA frames in place) and GPU
NMS, recording host RSS and device memory in use (cudaMemGetInfo) along the way: both must stay flat (issue 15's
"flat host and GPU memory" target). Launched by scripts/gpu_check.sh; prints and writes one JSON.

Usage: python scripts/gpu_soak.py OUT.json [FRAMES]"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np
import torch


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main(out: str, frames: int = 10_000) -> int:
    from cuda.bindings import runtime as rt

    from edgedeploy.runtime import cuda
    from edgedeploy.runtime.gpu_preprocess import GpuPreprocessor
    from edgedeploy.runtime.nms import batched_detections

    def gpu_used_mib() -> float:
        free, total = cuda.check(rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return (total - free) / 2**20

    rng = np.random.default_rng(0)
    host = [rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8) for _ in range(4)]
    pre = GpuPreprocessor((640, 640), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), letterbox=True)
    buf = cuda.DeviceBuffer(3 * 640 * 640 * 4)
    boxes = torch.rand(1, 8400, 4, device="cuda") * 600
    boxes[..., 2:] += boxes[..., :2] + 8
    scores = torch.rand(1, 8400, 80, device="cuda") ** 6
    samples = []
    t0 = time.perf_counter()
    for i in range(frames):
        f = host[i % 4] if i % 2 == 0 else torch.from_numpy(host[i % 4]).cuda(non_blocking=False)
        pre(f, buf.ptr)
        if i % 10 == 0:
            batched_detections(boxes, scores)
        if i % 1000 == 0 or i == frames - 1:
            pre.stream.synchronize()
            torch.cuda.synchronize()
            samples.append({"frame": i, "rss_mib": round(_rss_mib(), 1), "gpu_used_mib": round(gpu_used_mib(), 1)})
    pre.stream.synchronize()
    secs = time.perf_counter() - t0
    after_warmup = samples[1:] or samples
    growth = {k: round(after_warmup[-1][k] - after_warmup[0][k], 1) for k in ("rss_mib", "gpu_used_mib")}
    flat = growth["rss_mib"] < 20 and growth["gpu_used_mib"] < 20
    result = {"frames": frames, "seconds": round(secs, 1), "samples": samples,
              "growth_after_first_1000_mib": growth, "flat": flat}
    buf.free()
    pre.close()
    print(json.dumps(result))
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    return 0 if flat else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], *(int(a) for a in sys.argv[2:3])))
