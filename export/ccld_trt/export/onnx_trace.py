"""Tracing a torch module into an ONNX graph with graph_specs' names and dynamic dims, and writing ONNX files
(with external data past protobuf's 2 GB limit)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from torch import nn

from ccld_trt.export.export_versions import OPSET
from ccld_trt.export.graph_specs import GRAPHS
from ccld_trt.export.guided_unet import GuidedUNet
from ccld_trt.export.models import Networks
from ccld_trt.export.onnx_files import external_data
from ccld_trt.export.upsample_rewrite import fold_upsample_convs

# Symbolic dims exported as dynamic; "image_size" stays static: the ViT's position embeddings fix it.
DYNAMIC_DIMS = frozenset({"batch", "conds", "height", "width"})
# Protobuf cannot serialise a message of 2 GiB or more; the graph itself needs a little room beside the tensors.
EXTERNAL_DATA_THRESHOLD = onnx.checker.MAXIMUM_PROTOBUF - (64 << 20)


def graph_modules(networks: Networks) -> dict[str, nn.Module]:
    """The torch module whose function each graph computes (the original code's)."""
    return {"unet": networks.unet, "unet_cfg": GuidedUNet(networks.unet), "decoder": networks.decoder,
            "text_encoder": networks.text_encoder, "image_encoder": networks.image_encoder,
            "encoder": networks.encoder}


def traced_module(graph: str, module: nn.Module) -> nn.Module:
    """What is traced for ``graph``: ``module`` with the exact rewrites that make its graph cheaper (the
    decoder's upsampling convolutions in phase form, see upsample_rewrite); checked against ``module``."""
    return fold_upsample_convs(module) if graph == "decoder" else module


def is_dynamic(dim: int | str) -> bool:
    """Whether a graph_specs dim is exported dynamic ("8*height" is, as "height" is)."""
    return isinstance(dim, str) and dim.rpartition("*")[2] in DYNAMIC_DIMS


def trace(module: nn.Module, graph: str, inputs: Mapping[str, torch.Tensor], path: Path) -> None:
    """torch.onnx.export ``module`` (called with ``inputs`` in graph_specs order) to ``path``, with graph_specs'
    names and its symbolic dims in DYNAMIC_DIMS dynamic."""
    spec = GRAPHS[graph]
    dynamic_axes = {t.name: {i: str(d) for i, d in enumerate(t.shape) if is_dynamic(d)}
                    for t in (*spec.inputs, *spec.outputs)}
    with warnings.catch_warnings():
        # The GroupNorm trace warning is about a shape check that does not concern inference; the deprecation
        # notices are about the TorchScript exporter, the one verified to export these modules with dynamic shapes
        # (the dynamo exporter needs onnxscript).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs], opset_version=OPSET,
                          dynamic_axes=dynamic_axes, do_constant_folding=True, dynamo=False)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Serialised size of the model's initializers."""
    return sum(t.ByteSize() for t in model.graph.initializer)


def needs_external_data(nbytes: int, threshold: int = EXTERNAL_DATA_THRESHOLD) -> bool:
    """Whether ``nbytes`` of tensors must go to an external data file (protobuf's 2 GB limit)."""
    return nbytes > threshold


def save_onnx(model: onnx.ModelProto, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write ``model`` to ``path``, its tensors into ``<path>.data`` when they exceed ``threshold`` bytes.
    Returns the files written. With external data, ``model`` is left without its tensor contents (onnx moves
    them out in place)."""
    path = Path(path)
    data = external_data(path)
    data.unlink(missing_ok=True)  # onnx would append to it
    if needs_external_data(tensor_bytes(model), threshold):
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path, data]
    onnx.save_model(model, path)
    return [path]
