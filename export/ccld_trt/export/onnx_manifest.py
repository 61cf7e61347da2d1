"""What each exported graph file was made from: its manifest key (checkpoint SHA-256, configuration, exporter
and versions), the graph's metadata_props, and ``manifest.json``, which lets an unchanged graph be kept."""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from ccld_trt.export.atomic import write_atomic
from ccld_trt.export.autoencoder import load_autoencoder_config
from ccld_trt.export.checkpoints import sha256_file
from ccld_trt.export.cloob import cloob_image_size, load_cloob_config
from ccld_trt.export.fp16 import FP16_VERSION
from ccld_trt.export.models import ModelFiles
from ccld_trt.export.onnx_trace import OPSET
from ccld_trt.export.unet import infer_unet_config

# Bump when a change to the exporter (onnx_export, onnx_trace, upsample_rewrite) changes the graphs written: the
# manifest then redoes every export.
EXPORTER_VERSION = 3
MANIFEST = "manifest.json"
# Which checkpoint each graph comes from.
COMPONENT = {"unet": "unet", "unet_cfg": "unet", "decoder": "autoencoder", "text_encoder": "cloob",
             "image_encoder": "cloob", "encoder": "autoencoder"}


class GraphKeys:
    """The manifest key of each graph file: its checkpoint's SHA-256, its configuration, exporter and options.

    Checkpoint hashes are cached in the manifest by (path, size, mtime), so an unchanged rerun reads no weights.
    """

    def __init__(self, files: ModelFiles, hash_cache: dict[str, dict[str, Any]]) -> None:
        self._cache = hash_cache
        embed_dim, ddconfig = load_autoencoder_config(files.autoencoder_config)
        cloob_config = load_cloob_config(files.cloob_config)
        self.image_size = cloob_image_size(cloob_config)
        # The U-Net's configuration is implied by its checkpoint (see unet.infer_unet_config): no entry.
        self.known_configs: dict[str, dict[str, Any]] = {
            "autoencoder": {"embed_dim": embed_dim, "ddconfig": ddconfig}, "cloob": cloob_config}
        self.checkpoints = {"unet": files.unet, "autoencoder": files.autoencoder, "cloob": files.cloob}
        self._digests: dict[str, str] = {}

    def checkpoint_sha256(self, component: str) -> str:
        if component not in self._digests:
            self._digests[component] = _cached_sha256(Path(self.checkpoints[component]), self._cache)
        return self._digests[component]

    def key(self, graph: str, precision: str) -> dict[str, Any]:
        component = COMPONENT[graph]
        key: dict[str, Any] = {"checkpoint_sha256": self.checkpoint_sha256(component),
                               "config": self.known_configs.get(component), "exporter": EXPORTER_VERSION,
                               "opset": OPSET, "versions": versions()}
        if precision == "fp16":
            key["fp16"] = FP16_VERSION
        return key


def versions() -> dict[str, str]:
    """The versions of everything that shapes an exported graph (read from package metadata: importing onnxslim
    takes a second, which an up-to-date export should not spend)."""
    from importlib.metadata import version

    return {"ccld_trt": importlib.metadata.version("ccld-trt"), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxslim": version("onnxslim"), "onnxconverter_common": version("onnxconverter-common")}


def unet_config(unet: nn.Module) -> dict[str, Any]:
    """The U-Net's configuration, as its weights imply it, and its stored latent scale."""
    state = unet.state_dict()
    base, multipliers = infer_unet_config(state)
    return {"base_channels": base, "channel_multipliers": multipliers,
            "parameters": sum(p.numel() for p in unet.parameters()),
            "autoencoder_scale": float(state["autoencoder_scale"])}


def _cached_sha256(path: Path, cache: dict[str, dict[str, Any]]) -> str:
    stat = path.stat()
    entry = cache.get(str(path.resolve()))
    if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
        return str(entry["sha256"])
    digest = sha256_file(path)
    cache[str(path.resolve())] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    return digest


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest, or an empty one when it is missing or unreadable (then everything is exported again)."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        if isinstance(manifest.get("graphs"), dict) and isinstance(manifest.get("hashes"), dict):
            return manifest
    except (OSError, ValueError, AttributeError):
        pass
    return {"graphs": {}, "hashes": {}}


def write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> None:
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def is_current(manifest: Mapping[str, Any], out_dir: Path, graph: str, precision: str,
               key: Mapping[str, Any]) -> bool:
    """Whether the manifest's record of this file has ``key`` and its files are there, with the recorded sizes."""
    record = manifest["graphs"].get(graph, {}).get(precision) or {}
    if record.get("key") != key or not record.get("files"):
        return False
    return all((out_dir / name).is_file() and (out_dir / name).stat().st_size == size
               for name, size in record["files"].items())


def graph_metadata(graph: str, precision: str, keys: GraphKeys, config: Mapping[str, Any]) -> dict[str, str]:
    """metadata_props of a graph file: where it comes from and how it was made."""
    component = COMPONENT[graph]
    return {
        "ccld_trt.graph": graph,
        "ccld_trt.precision": precision,
        "ccld_trt.source_sha256": json.dumps({component: keys.checkpoint_sha256(component)}),
        "ccld_trt.model_config": json.dumps(config, sort_keys=True),
        "ccld_trt.versions": json.dumps({**versions(), "exporter": EXPORTER_VERSION, "opset": OPSET}),
    }
