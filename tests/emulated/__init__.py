"""CPU stand-ins for the GPU path, used by the `emulated_gpu` tests (they live in the tests, not in the package).

- `kernel_cpu`: compiles the real NVRTC kernel source with the system C++ compiler and a shim header defining the
  CUDA built-ins, and launches it over the same grid the launcher computes (`gpu_preprocess.launch_config`).
- `fake_cuda`: a stand-in for `edgedeploy.runtime.cuda` (streams that queue work until synchronised, events,
  device buffers in host memory pre-filled with a marker byte, pinned buffers, CUDA-graph capture/replay,
  kernels run by `kernel_cpu`), installed with `fake_cuda.install(monkeypatch)`.
- `fake_tensorrt`: a stand-in `tensorrt` module whose engines run the exported ONNX in ONNX Runtime on the
  fake device buffers; `fake_tensorrt.install(monkeypatch)` and `fake_tensorrt.build_engine(onnx, engine, ...)`.
"""
