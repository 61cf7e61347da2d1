"""The version numbers that key an exported graph in its manifest (onnx_manifest), kept apart from the exporter's
modules so that checking whether a graph is current imports neither onnx nor the exporter."""

from __future__ import annotations

# Bump when a change to the exporter (onnx_export, onnx_trace, upsample_rewrite) changes the graphs written: the
# manifest then redoes every export.
EXPORTER_VERSION = 3
OPSET = 17  # LayerNormalization needs 17; TensorRT 10 parses opsets 9 to 20
# Bump when the fp16 conversion rules (fp16.py) change: the export manifest then redoes the fp16 graphs.
FP16_VERSION = 1
