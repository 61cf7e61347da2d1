"""Backends: torch (reference), onnxruntime and tensorrt, all behind one interface."""
