"""FP32 vs FP16 top-1 of a trained classifier checkpoint on the GPU (PyTorch, the same val set), for
scripts/gpu_check.sh. Usage: python scripts/gpu_fp16_accuracy.py RUN/best.pt OUT.json"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(ckpt: str, out: str) -> int:
    from edgedeploy.data.imagefolder import classification_datasets
    from edgedeploy.eval.classify import evaluate_classifier, load_classifier
    from edgedeploy.models.artifact import describe_artifact

    desc = describe_artifact(ckpt)
    saved = desc.data.get("train_args") or {}
    mean, std = desc.convention.unit_mean_std()
    _, val, _, root = classification_datasets(
        desc.data.get("data") or "synthetic", desc.imgsz, mean, std,
        num_classes=len(desc.class_names) if desc.class_names else None,
        seed=int(saved.get("seed", 0)), augment=False, progress=False)
    model, _ = load_classifier(ckpt, desc.model, None)
    model = model.cuda().eval()
    result = {"checkpoint": ckpt, "data": str(root), "gpu": torch.cuda.get_device_name(0)}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        m = model.to(dtype)

        @torch.no_grad()
        def predict(x, m=m, dtype=dtype):
            return m(torch.as_tensor(x).cuda().to(dtype)).float().cpu().numpy()

        t0 = time.perf_counter()
        scores = evaluate_classifier(predict, val, batch_size=64, progress=False)
        result[name] = {"top1": scores["top1"], "top5": scores["top5"], "n": scores["n"],
                        "seconds": round(time.perf_counter() - t0, 2)}
    result["top1_drop_points"] = round(100 * (result["fp32"]["top1"] - result["fp16"]["top1"]), 3)
    print(json.dumps(result))
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
