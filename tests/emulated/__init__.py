"""CPU stand-ins for the GPU path, used by the `emulated_gpu` tests (they live in the tests, not in the package).

- `kernel_cpu`: compiles the real NVRTC kernel source with the system C++ compiler and a shim header defining the
  CUDA built-ins, and launches it over the same grid the launcher computes (`gpu_preprocess.launch_config`).
- `fake_cuda`: a stand-in for `edgedeploy.runtime.cuda` (streams that queue work until synchronised, events,
  device buffers in host memory pre-filled with a marker byte, pinned buffers, CUDA-graph capture/replay,
  kernels run by `kernel_cpu`), installed with `fake_cuda.install(monkeypatch)`.
- `fake_tensorrt`: a stand-in `tensorrt` module whose engines run the exported ONNX in ONNX Runtime on the
  fake device buffers; `fake_tensorrt.install(monkeypatch)` and `fake_tensorrt.build_engine(onnx, engine, ...)`.

Use from a test (the file must sit in tests/, which pytest puts on sys.path):

    from emulated import fake_cuda, fake_tensorrt

    def test_x(monkeypatch, tmp_path):
        ledger = fake_cuda.install(monkeypatch)              # edgedeploy.runtime.cuda -> CPU stand-ins
        fake_tensorrt.install(monkeypatch)                   # `import tensorrt` -> the ORT-backed stand-in
        engine = fake_tensorrt.build_engine(onnx, tmp_path / "m.engine", max_batch=2, fp16_io=False)
        pipe = Detector(engine, cuda_graph=True)             # real TensorRTEngine + GpuPreprocessor code
        ...
        pipe.close(); assert ledger.live() == {}             # nothing leaked

A backend that hands device pointers around can read them with `fake_cuda.LEDGER.memory(ptr, nbytes, what)`
(raises when the range is not inside a live allocation) and queue work with `fake_cuda._stream_of(handle).enqueue(fn)`.
"""
