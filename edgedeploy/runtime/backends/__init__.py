"""Engine backends: TensorRT (`tensorrt`), ONNX Runtime (`onnxruntime`), PyTorch eager (`torch`)."""
