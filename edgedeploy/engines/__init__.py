"""Engine builders (TensorRT, TensorRT-RTX) and the artifact sidecar."""
