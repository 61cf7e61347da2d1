"""Fetch the published weights into the models directory (the one step that needs a network)."""

from __future__ import annotations

import re
from pathlib import Path

from ccld_trt.export.errors import UserError
from ccld_trt.export.models import AE_CONFIG_FILE, AE_FILE, DEFAULT_CLOOB_CONFIG, UNET_FILE

HF_FILES = [  # (repository, file)
    ("huggan/distill-ccld-wa", UNET_FILE),
    ("huggan/ccld_wa", AE_FILE),
    ("huggan/ccld_wa", AE_CONFIG_FILE),
]
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{64})\.pkl$")


def manual_instructions(directory: Path, cloob_url: str) -> str:
    hf = "; ".join(f"{f} from https://huggingface.co/{r}" for r, f in HF_FILES)
    return f"put {hf}; and {cloob_url} into {directory}"


def download_models(directory: Path, cloob_config: str = DEFAULT_CLOOB_CONFIG) -> list[Path]:
    """Download the U-Net, the autoencoder (+ YAML) and the CLOOB pickle, with progress bars.

    Files already present are kept (huggingface_hub checks them against the hub; the CLOOB pickle against the
    SHA-256 in its name). Without a network: one UserError saying what to put where.
    """
    import pooch
    from huggingface_hub import hf_hub_download

    from ccld_trt.export.cloob import load_cloob_config

    url = load_cloob_config(cloob_config).get("url")
    if not url:
        raise UserError(f"CLOOB config {cloob_config} has no 'url' to download the checkpoint from")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for repo, name in HF_FILES:
            paths.append(Path(hf_hub_download(repo, name, local_dir=directory)))
        name = url.rsplit("/", 1)[-1]
        match = _HASH_IN_NAME.search(name)
        paths.append(Path(pooch.retrieve(url, known_hash=f"sha256:{match.group(1)}" if match else None,
                                         fname=name, path=directory, progressbar=True)))
    except Exception as e:  # network layers raise many types; all mean the same to the user
        if isinstance(e, UserError):
            raise
        if "hash" in str(e).lower():
            raise UserError(f"downloaded CLOOB checkpoint failed its SHA-256 check: {e}") from e
        raise UserError(f"download failed ({type(e).__name__}); offline? "
                        + manual_instructions(directory, url)) from e
    return paths
