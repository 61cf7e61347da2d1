"""The exported graphs' I/O contracts, shared by the ONNX exporter, the engine builder and the runtimes.

Dimension names: ``batch`` (images, or rows of a batched call), ``conds`` (CFG conditions), ``height`` /
``width`` (latent size; images are 8x larger: ``8*height`` on the decoder's output and the encoder's input),
``image_size`` (the CLOOB image encoder's input side).
"""

from __future__ import annotations

from dataclasses import dataclass

Dim = int | str

# CLIP token ids: the text graph's input is [batch, CONTEXT_LENGTH] int64, SOT first, padded after the first EOT.
CONTEXT_LENGTH = 77
SOT_TOKEN = 49406
EOT_TOKEN = 49407


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name of the graph I/O (fp16 graphs keep fp32 I/O)
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


LATENT = ("batch", 4, "height", "width")

UNET = GraphSpec(
    "unet",
    (TensorSpec("x", "float32", LATENT), TensorSpec("t", "float32", ("batch",)),
     TensorSpec("embed", "float32", ("batch", 512))),
    (TensorSpec("v", "float32", LATENT),),
)
UNET_CFG = GraphSpec(
    "unet_cfg",
    (TensorSpec("x", "float32", LATENT), TensorSpec("t", "float32", ("batch",)),
     TensorSpec("conds", "float32", ("conds", 512)), TensorSpec("weights", "float32", ("conds",))),
    (TensorSpec("v", "float32", LATENT),),
)
# The autoencoder's encoding half (image-to-image): images in [-1, 1] -> the posterior mean, before the scale.
ENCODER = GraphSpec(
    "encoder",
    (TensorSpec("images", "float32", ("batch", 3, "8*height", "8*width")),),
    (TensorSpec("latents", "float32", LATENT),),
)
DECODER = GraphSpec(
    "decoder",
    (TensorSpec("latents", "float32", LATENT),),
    (TensorSpec("images", "float32", ("batch", 3, "8*height", "8*width")),),
)
TEXT_ENCODER = GraphSpec(
    "text_encoder",
    (TensorSpec("tokens", "int64", ("batch", CONTEXT_LENGTH)),),
    (TensorSpec("embed", "float32", ("batch", 512)),),
)
IMAGE_ENCODER = GraphSpec(
    "image_encoder",
    (TensorSpec("pixels", "float32", ("batch", 3, "image_size", "image_size")),),
    (TensorSpec("embed", "float32", ("batch", 512)),),
)

GRAPHS: dict[str, GraphSpec] = {g.name: g for g in (UNET, UNET_CFG, DECODER, TEXT_ENCODER, IMAGE_ENCODER, ENCODER)}
# What the onnxruntime, openvino and tensorrt backends run (the plain `unet` graph is for other runtimes).
BACKEND_GRAPHS = ("unet_cfg", "decoder", "text_encoder", "image_encoder", "encoder")
# Precisions the graphs are exported in: fp32, and mixed-precision fp16 (fp32 I/O, fp32 where fp16 is unsafe).
GRAPH_PRECISIONS = ("fp32", "fp16")
# Backend graphs that only some requests run (image prompts, an init image): a backend opens them on first use,
# so that a text-only request does not wait for them.
ON_DEMAND_GRAPHS = ("image_encoder", "encoder")
# The backend graphs every request runs (a text-only request runs only these)
EAGER_GRAPHS = tuple(graph for graph in BACKEND_GRAPHS if graph not in ON_DEMAND_GRAPHS)
