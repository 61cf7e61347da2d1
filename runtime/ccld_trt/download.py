"""Fetch the published weights into the models directory (the one step that needs a network)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ccld_trt.export.checkpoints import safetensors_copy
from ccld_trt.export.errors import UserError, first_line
from ccld_trt.export.models import AE_CONFIG_FILE, AE_FILE, DEFAULT_CLOOB_CONFIG, UNET_FILE

CONVERTED = [(UNET_FILE, "U-Net checkpoint"), (AE_FILE, "autoencoder checkpoint")]
HF_FILES = [  # (repository, file)
    ("huggan/distill-ccld-wa", UNET_FILE),
    ("huggan/ccld_wa", AE_FILE),
    ("huggan/ccld_wa", AE_CONFIG_FILE),
]
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{64})\.pkl$")
# A download whose connection breaks mid-body starts again this many times in all (pooch cannot resume).
_CLOOB_ATTEMPTS = 3


def manual_instructions(directory: Path, cloob_url: str) -> str:
    hf = "; ".join(f"{f} from https://huggingface.co/{r}" for r, f in HF_FILES)
    return f"put {hf}; and {cloob_url} into {directory}"


def download_models(directory: Path, cloob_config: str = DEFAULT_CLOOB_CONFIG,
                    endpoint: str | None = None) -> list[Path]:
    """Download the U-Net, the autoencoder (+ YAML) and the CLOOB pickle, with progress bars.

    ``endpoint`` is the hub's address (default huggingface_hub's: $HF_ENDPOINT, else https://huggingface.co);
    the CLOOB pickle comes from the ``url`` of ``cloob_config``. Files already present are kept
    (huggingface_hub checks them against the hub; the CLOOB pickle against the SHA-256 in its name). A U-Net or
    autoencoder download that breaks off resumes where it stopped; a CLOOB one starts again. Without a network:
    one UserError at once (no retries) saying what to put where. Returns the four paths (``ccld-trt download``
    then makes the safetensors copies with ``convert_checkpoints``).
    """
    from huggingface_hub import constants

    url = load_cloob_url(cloob_config)
    directory.mkdir(parents=True, exist_ok=True)
    if constants.HF_HUB_OFFLINE and not all((directory / name).is_file() for _, name in HF_FILES):
        raise UserError("HF_HUB_OFFLINE is set; " + manual_instructions(directory, url))
    try:
        paths = _hub_files(directory, endpoint)
        paths.append(_cloob_file(directory, url))
    except UserError:
        raise
    except Exception as e:  # network layers raise many types; to the user they mean one of two things
        raise UserError(_failure(e) + manual_instructions(directory, url)) from e
    return paths


def convert_checkpoints(directory: Path) -> list[Path]:
    """Safetensors copies of the U-Net and autoencoder checkpoints in ``directory`` (which it then prefers)."""
    return [safetensors_copy(directory / name, what) for name, what in CONVERTED if (directory / name).is_file()]


def load_cloob_url(cloob_config: str) -> str:
    """The ``url`` of a CLOOB config (a JSON path or a built-in name); UserError when it has none."""
    from ccld_trt.export.cloob_config import load_cloob_config

    url = load_cloob_config(cloob_config).get("url")
    if not url:
        raise UserError(f"CLOOB config {cloob_config} has no 'url' to download the checkpoint from")
    return str(url)


def _hub_files(directory: Path, endpoint: str | None) -> list[Path]:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    paths = []
    reached = False
    for repo, name in HF_FILES:
        if not reached and not (directory / name).is_file():
            # Without a local copy, hf_hub_download retries a failed first request 5 times with back-off
            # (about 25 s). One request without retries first makes an unreachable hub fail at once.
            get_hf_file_metadata(hf_hub_url(repo, name, endpoint=endpoint), endpoint=endpoint)
            reached = True
        paths.append(Path(hf_hub_download(repo, name, local_dir=directory, endpoint=endpoint)))
    return paths


def _cloob_file(directory: Path, url: str) -> Path:
    import pooch

    name = url.rsplit("/", 1)[-1]
    match = _HASH_IN_NAME.search(name)
    try:
        # pooch fetches into a temporary file and moves it into place only once its hash matches.
        return Path(pooch.retrieve(url, known_hash=f"sha256:{match.group(1)}" if match else None, fname=name,
                                   path=directory, downloader=_restarting_downloader()))
    except ValueError as e:
        if "hash" not in str(e).lower():
            raise
        raise UserError(f"the CLOOB checkpoint from {url} failed its SHA-256 check and was not kept: "
                        + first_line(e)) from e


def _restarting_downloader() -> Callable[..., Any]:
    """A pooch downloader that starts again when the connection breaks mid-body, but not when it never opens.

    pooch's own ``retry_if_failed`` would also retry (and sleep on) a refused connection, which offline only
    delays the error.
    """
    import pooch
    import requests

    http = pooch.HTTPDownloader(progressbar=True)

    def download(url: str, output_file: str, pooch_: Any, check_only: bool = False) -> Any:
        for _ in range(_CLOOB_ATTEMPTS - 1):
            try:  # output_file is a path, so each attempt reopens (truncates) it
                return http(url, output_file, pooch_, check_only=check_only)
            except requests.exceptions.ChunkedEncodingError:  # the connection broke after the headers
                continue
        return http(url, output_file, pooch_, check_only=check_only)  # the last attempt's error goes up

    return download


def _failure(error: Exception) -> str:
    """The start of the one-line message: what the server said, or that it could not be reached."""
    import requests
    from huggingface_hub.utils import HfHubHTTPError

    if isinstance(error, (HfHubHTTPError, requests.exceptions.HTTPError)):
        return f"download failed: {first_line(error)}; "
    return f"download failed ({type(error).__name__}: {first_line(error)}); offline? "

