"""`eval.predictors`: every artifact runs through the runtime Engine API, batched to what the engine accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgedeploy.eval.predictors import artifact_predict_fn, engine_predict_fn, run_engine, torch_predict_fn
from edgedeploy.runtime.engine import TensorSpec


class _Engine:
    """Stands in for a runtime Engine: FP16 input and output, `max_batch` 3, output = 2 * input's first pixel."""

    def __init__(self, batch: int, max_batch: int | None):
        self.input = TensorSpec("images", (batch, 3, 2, 2), np.dtype(np.float16))
        self.outputs = [TensorSpec("logits", (batch, 1), np.dtype(np.float16))]
        self.max_batch = max_batch
        self.batches: list[int] = []

    def infer(self, x):
        assert x.dtype == np.float16
        self.batches.append(len(x))
        return {"logits": 2 * x[:, 0, 0, :1]}


@pytest.mark.parametrize("batch, max_batch, calls", [(-1, 3, [3, 3, 1]), (2, 2, [2, 2, 2, 2]), (-1, None, [7])])
def test_engine_batches_are_chunked_padded_cast_and_in_order(batch, max_batch, calls):
    engine = _Engine(batch, max_batch)
    x = np.arange(7, dtype=np.float32)[:, None, None, None] * np.ones((7, 3, 2, 2), np.float32)
    out = engine_predict_fn(engine)(x)
    assert engine.batches == calls
    assert out.dtype == np.float32 and out[:, 0].tolist() == [0, 2, 4, 6, 8, 10, 12]
    assert list(run_engine(engine)(x)) == ["logits"]


def test_an_onnx_file_scores_like_its_torch_model(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 8, 8), str(path), input_names=["images"], output_names=["logits"],
                      opset_version=17, dynamo=False)  # static batch 1: the predictor feeds one image at a time
    predict, batch = artifact_predict_fn(path, batch=8)
    x = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    assert batch == 1
    np.testing.assert_allclose(predict(x), torch_predict_fn(model)(x), atol=1e-5)
