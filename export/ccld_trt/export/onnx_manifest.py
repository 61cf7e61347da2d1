"""What each exported graph file was made from: its manifest key (checkpoint SHA-256, configuration, exporter
and versions), the graph's metadata_props, and ``manifest.json``, which lets an unchanged graph be kept."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccld_trt.export.atomic import write_atomic
from ccld_trt.export.autoencoder_config import load_autoencoder_config
from ccld_trt.export.cloob_config import cloob_image_size, load_cloob_config
from ccld_trt.export.export_versions import EXPORTER_VERSION, FP16_VERSION, OPSET
from ccld_trt.export.file_digests import cached_sha256
from ccld_trt.export.graph_specs import GRAPH_PRECISIONS
from ccld_trt.export.models import ModelFiles

if TYPE_CHECKING:  # whether the graphs are current is read without torch (a graph backend's start needs no more)
    from torch import nn

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
            self._digests[component] = cached_sha256(Path(self.checkpoints[component]), self._cache)
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

    return {"ccld_trt": version("ccld-trt"), "torch": version("torch"), "onnx": version("onnx"),
            "onnxslim": version("onnxslim"), "onnxconverter_common": version("onnxconverter-common")}


def unet_config(unet: nn.Module) -> dict[str, Any]:
    """The U-Net's configuration, as its weights imply it, and its stored latent scale."""
    from ccld_trt.export.unet import infer_unet_config

    state = unet.state_dict()
    base, multipliers = infer_unet_config(state)
    return {"base_channels": base, "channel_multipliers": multipliers,
            "parameters": sum(p.numel() for p in unet.parameters()),
            "autoencoder_scale": float(state["autoencoder_scale"])}


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest, or an empty one when it is missing or unreadable (then everything is exported again)."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
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


def stale_graphs(files: ModelFiles, out_dir: Path, graphs: Sequence[str],
                 fp16: bool) -> tuple[list[tuple[str, str]], GraphKeys, dict[str, Any]]:
    """Which (graph, precision) files of ``graphs`` (fp32, and fp16 too if ``fp16``) in ``out_dir`` are not up
    to date for ``files``, with the keys and the manifest they were judged by. Reads no weights while the
    checkpoints' size and mtime match the manifest's digest cache; digests computed anew are written back."""
    manifest = read_manifest(out_dir)
    unchanged = json.dumps(manifest, sort_keys=True)
    keys = GraphKeys(files, manifest["hashes"])
    wanted = [(g, p) for g in graphs for p in (GRAPH_PRECISIONS if fp16 else ("fp32",))]
    stale = [(g, p) for g, p in wanted if not is_current(manifest, out_dir, g, p, keys.key(g, p))]
    if json.dumps(manifest, sort_keys=True) != unchanged and out_dir.is_dir():  # checkpoint hashes computed anew
        write_manifest(out_dir, manifest)
    return stale, keys, manifest


def graphs_current(files: ModelFiles, out_dir: Path, graphs: Sequence[str], fp16: bool) -> bool:
    """Whether every file of ``graphs`` in ``out_dir`` is up to date for ``files`` (see ``stale_graphs``)."""
    return not stale_graphs(files, Path(out_dir), graphs, fp16)[0]


def why_stale(manifest: Mapping[str, Any], graph: str, precision: str, key: Mapping[str, Any]) -> str:
    """Why a file ``stale_graphs`` named must be exported, in words: missing, or what changed since."""
    record = manifest["graphs"].get(graph, {}).get(precision) or {}
    old = record.get("key")
    if not old:
        return "not exported yet"
    changed = [name for name in key if old.get(name) != key[name]]
    if "checkpoint_sha256" in changed:
        return f"its {COMPONENT[graph]} checkpoint changed"
    return f"{', '.join(changed)} changed" if changed else "its files changed"
