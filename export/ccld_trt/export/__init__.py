"""PyTorch side: model definitions that load the original checkpoints, checkpoint I/O, ONNX export."""
