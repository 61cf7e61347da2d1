"""TensorRT side: engine building from ONNX graphs, sidecar metadata, engine loading."""
