"""The Python API: ``Pipeline.load`` opens the models on a backend once, ``pipe(prompts, ...)`` makes images.

    from ccld_trt import Pipeline
    with Pipeline.load("models", backend="openvino", device="cpu") as pipe:
        result = pipe(["a lighthouse at dusk:3"], seed=0, steps=50, n=4)
    result.images[0].save("lighthouse.png")

Jobs are assembled by ``jobs.assemble``, as the command line's, the web page's and the cluster's are, so the
same input gives the same images and the same one-line errors (UserError) everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ccld_trt import jobs
from ccld_trt.export.build_dir import DEFAULT_ENGINE_DIR
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import EAGER_GRAPHS
from ccld_trt.jobs import ImagePromptInput, ImageSource, Job, PromptInput
from ccld_trt.pipeline import DEFAULT_AUTOENCODER_SCALE, Request
from ccld_trt.runner import BackendOptions, ModelSource, Session, open_session
from ccld_trt.sampler_names import PRESETS, chosen_preset

if TYPE_CHECKING:
    from concurrent.futures import Future
    from typing import Unpack

    from ccld_trt.backends.base import Opened
    from ccld_trt.jobs import RequestFields

# callback(done, total) after each U-Net evaluation of a job
Callback = Callable[[int, int], object]


@dataclass
class Result:
    """What one call made. ``latents``: float32 [n, 4, h, w] on the CPU, before the autoencoder scale;
    ``pixels``: uint8 [n, 8h, 8w, 3], the same images as ``images``; ``seconds``: per stage ("conditioning",
    "sampling", "decoding") and "total"; ``backend``: which backend and precision made them."""

    images: list[Image.Image]
    latents: torch.Tensor
    pixels: np.ndarray
    seconds: dict[str, float]
    backend: str
    request: Request

    def save(self, directory: str | Path) -> list[Path]:
        """Write the images as out_NNNNN.png after the directory's existing ones (never overwriting)."""
        from ccld_trt.outputs import save_images

        return save_images(self.pixels, Path(directory))


class Pipeline:
    """The networks of one model directory on one backend, loaded once; call it to generate images."""

    def __init__(self, session: Session, options: BackendOptions) -> None:
        self._session: Session | None = session
        self.options = options

    @classmethod
    def open(cls, options: BackendOptions, models: ModelSource, prefetched: Future[Opened] | None = None,
             graphs: Sequence[str] = EAGER_GRAPHS) -> Pipeline:
        """The pipeline of ``models`` run as ``options`` say (UserError when that cannot run here).
        ``prefetched``: runner.prefetch_graphs's for the same options and models, if it was started. ``graphs``:
        the backend graphs exported now where they are not (runner.open_session; the others on first use)."""
        options = options.resolved()
        return cls(open_session(options, models, prefetched, graphs), options)

    @classmethod
    def load(cls, models: str | Path | None = None, backend: str = "torch", device: str = "cpu",
             precision: str | None = None, *, cuda_graph: bool = False, onnx_dir: str | Path | None = None,
             engine_dir: str | Path = DEFAULT_ENGINE_DIR, trt_flavor: str = "auto") -> Pipeline:
        """Open the models directory ``models`` (default $CCLD_TRT_MODELS or ./models, laid out as ``ccld-trt
        download`` writes it) on ``backend`` (torch, onnxruntime, openvino, tensorrt) and ``device``.

        ``precision`` None is the backend's default, as on the command line; the other options are those of
        ``ccld-trt sample``'s backend flags.
        """
        from ccld_trt.export.models import ModelFiles, models_dir

        options = BackendOptions(backend=backend, device=device, precision=precision, cuda_graph=cuda_graph,
                                 engine_dir=Path(engine_dir), onnx_dir=Path(onnx_dir) if onnx_dir else None,
                                 trt_flavor=trt_flavor)
        return cls.open(options, ModelSource(ModelFiles.resolve(models_dir(models))))

    @property
    def session(self) -> Session:
        if self._session is None:
            raise UserError("this pipeline is closed")
        return self._session

    @property
    def backend(self) -> str:
        """e.g. "openvino bf16 on cpu"."""
        return self.options.describe()

    @property
    def demo_weights(self) -> bool:
        """Whether the models are random demo weights (``ccld-trt demo-weights``): noise-like images."""
        return self.session.demo

    def assemble(self, prompts: PromptInput | Sequence[PromptInput] = (),
                 image_prompts: ImagePromptInput | Sequence[ImagePromptInput] = (), *,
                 autoencoder_scale: float | str | None = None, init: ImageSource | None = None,
                 **fields: Unpack[RequestFields]) -> Job:
        """A validated job for this pipeline (see ``__call__``), its image prompts loaded."""
        if autoencoder_scale == "checkpoint":
            scale: Any = self.session.checkpoint_autoencoder_scale
        else:
            scale = DEFAULT_AUTOENCODER_SCALE if autoencoder_scale is None else autoencoder_scale
        return jobs.assemble(prompts, image_prompts, image_size=self.session.image_size, autoencoder_scale=scale,
                             init=init, **fields)

    def run(self, job: Job, callback: Callback | None = None, progress: bool | None = None,
            on_stage: Callable[[str], None] | None = None) -> Result:
        """Generate an assembled job. ``callback(done, total)`` after each U-Net evaluation; ``progress``: a
        tqdm bar on stderr (None: when stderr is a terminal); ``on_stage(name)`` as each stage starts."""
        from tqdm import tqdm

        total = job.request.evaluations
        start = time.perf_counter()
        with tqdm(total=total, desc="sampling", unit="eval", disable=None if progress is None else not progress,
                  leave=False) as bar:
            done = 0

            def evaluated() -> None:
                nonlocal done
                done += 1
                bar.update()
                if callback is not None:
                    callback(done, total)

            out = jobs.run(self.session.backend, job, evaluated, on_stage)
        seconds = {**out.seconds, "total": time.perf_counter() - start}
        return Result([Image.fromarray(p) for p in out.pixels], out.latents, out.pixels, seconds, self.backend,
                      job.request)

    def __call__(self, prompts: PromptInput | Sequence[PromptInput] = (),
                 image_prompts: ImagePromptInput | Sequence[ImagePromptInput] = (), *,
                 autoencoder_scale: float | str | None = None, init: ImageSource | None = None,
                 fast: bool = False, preset: str | None = None, callback: Callback | None = None,
                 progress: bool | None = None, **fields: Unpack[RequestFields]) -> Result:
        """Generate images, as ``ccld-trt sample`` does.

        prompts: "text" or "text:weight" strings (weight 3 when absent) or (text, weight) pairs.
        image_prompts: paths, encoded image bytes or PIL images, each alone (weight 3) or as (image, weight).
        fields: n (images, default 1), batch_size (images per batch, default all n), seed (0), steps (50),
            method (plms; see ``ccld_trt.samplers.METHODS``), eta (ddim noise, 0), strength (with ``init``:
            the starting timestep in (0, 1], default 0.9).
        init: image to image: start from this image (a path, encoded bytes or a PIL image) noised to
            ``strength`` instead of from pure noise.
        fast: the fast preset (as ``sample --fast``); the same as ``preset="fast"``.
        preset: a named method and step count (``sampler_names.PRESETS``: "fast", "balanced"; as ``sample
            --preset``): it sets method and steps.
        autoencoder_scale: latents x this before decoding: a number, "checkpoint" (the U-Net checkpoint's
            stored value) or None (2.55, as the published demo).
        callback: ``callback(done, total)`` after each U-Net evaluation (e.g. for a progress bar of your own).
        progress: a tqdm bar on stderr; None shows it when stderr is a terminal.

        Bad input raises UserError (InvalidRequest for a bad field) with a one-line message naming it.
        """
        if (chosen := chosen_preset(fast, preset)) is not None:
            fields["method"], fields["steps"] = PRESETS[chosen]
        job = self.assemble(prompts, image_prompts, autoencoder_scale=autoencoder_scale, init=init, **fields)
        return self.run(job, callback, progress)

    def close(self) -> None:
        """Let go of the models (and the GPU memory they hold); the pipeline cannot be called afterwards."""
        session, self._session = self._session, None
        if session is not None and session.backend.device.type == "cuda":
            del session
            torch.cuda.empty_cache()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
