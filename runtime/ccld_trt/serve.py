"""``ccld-trt serve``: a Gradio page over the library, with the models loaded once per process.

The page comes up at once while the models load in a background thread. Jobs go through a queue that runs
one at a time (one device, one copy of the models), report progress per U-Net evaluation, and show the
latency of each stage with the images. Every bad input is answered in the page; none takes the server down.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ccld_trt import collector
from ccld_trt.access import Keys, check_exposure, page_login
from ccld_trt.access import check_host as check_host  # the --listen half of the host rule (re-exported)
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import BACKEND_GRAPHS
from ccld_trt.limits import MAX_IMAGE_PIXELS as MAX_UPLOAD_PIXELS  # the page's limit (tests read it here)
from ccld_trt.limits import MAX_IMAGES, MAX_STEPS, MAX_UPLOAD_BYTES
from ccld_trt.model_loader import ModelLoader as ModelLoader  # re-exported: the page's tests build one
from ccld_trt.outputs import save_images
from ccld_trt.runner import BackendOptions, ModelSource, Session, open_session
from ccld_trt.sampler_names import DEFAULT_AUTOENCODER_SCALE, DEFAULT_STRENGTH, METHODS, PRESETS
from ccld_trt.stopping import LAST_RESORT_S, StopSignals, bounded

# No torch before the page answers: it is imported (with the jobs' code) by the first job and by the model loader,
# which starts once the page is up.
if TYPE_CHECKING:
    import gradio as gr

    from ccld_trt.jobs import Job

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# After SIGINT or SIGTERM, the clean-up steps (cancel the running job, close the HTTP server, remove the work
# directory) get this long in all: the process is gone within 15 s of the signal even when a U-Net evaluation of a
# job takes many seconds (a busy CPU; then the job ends with the process instead, at the end of this time).
STOP_BUDGET_S = 10.0
DEMO_WARNING = ("⚠ RANDOM DEMO WEIGHTS — these models were written by <code>ccld-trt demo-weights</code>: "
                "images will be noise-like patterns, not paintings.")


@dataclass(frozen=True)
class Timings:
    """Seconds per stage of one job (each measured after the device has finished its work)."""

    conditioning: float
    sampling: float
    decoding: float
    evaluations: int

    def markdown(self) -> str:
        total = self.conditioning + self.sampling + self.decoding
        per_eval = 1000 * self.sampling / self.evaluations
        return (f"**Latency** — conditioning {self.conditioning:.3f} s · sampling {self.sampling:.3f} s "
                f"({self.evaluations} U-Net evaluations, {per_eval:.1f} ms each) · "
                f"decoding {self.decoding:.3f} s · total {total:.3f} s")


def _whole(value: Any, name: str) -> int:
    # The page sends numbers as JSON floats; API clients may send strings. Both are fine when exact.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise UserError(f"{name} must be a whole number, got {value!r}")


def _real(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{name} must be finite, got {value!r}")
    return number


# How the page names the fields of a pipeline Request
_PAGE_NAMES = {"n": "the number of images", "seed": "the seed", "method": "the sampler",
               "autoencoder_scale": "the autoencoder scale", "image_prompts[0].weight": "the image prompt weight",
               "strength": "the strength"}


def parse_job(prompts: Any, image: Any, image_weight: Any, steps: Any, method: Any, seed: Any, n: Any,
              autoencoder_scale: Any, *, image_size: int, init: Any = None, strength: Any = None) -> Job:
    """The page's raw input values -> a Job (the shared assembly's), or UserError naming the first bad value.

    ``prompts`` holds one TEXT[:WEIGHT] per line (blank lines ignored); ``image`` is Gradio's upload record
    (a dict with the uploaded file's ``path``) or None; ``image_size``: the CLOOB image encoder's input side.
    ``init`` (image-to-image) is an upload record like ``image``, ``strength`` its starting timestep.
    """
    if prompts is not None and not isinstance(prompts, str):
        raise UserError(f"prompts must be text, got {prompts!r}")
    numbered = [(number, line.strip()) for number, line in enumerate((prompts or "").splitlines(), 1)
                if line.strip()]
    image_prompts = []
    if image is not None:
        path = image.get("path") if isinstance(image, dict) else None
        if not path:
            raise UserError("the image prompt upload was not received; upload it again")
        image_prompts.append((Path(path), _real(image_weight, "the image prompt weight")))
    init_fields: dict[str, Any] = {}
    if init is not None:
        init_path = init.get("path") if isinstance(init, dict) else None
        if not init_path:
            raise UserError("the init image upload was not received; upload it again")
        init_fields = {"init": Path(init_path), "strength": _real(strength, "the strength")}
    from ccld_trt import jobs
    from ccld_trt.pipeline import InvalidRequest

    try:
        return jobs.assemble([line for _, line in numbered], image_prompts, image_size=image_size, untrusted=True,
                             autoencoder_scale=_real(autoencoder_scale, "the autoencoder scale"),
                             steps=_whole(steps, "steps"), n=_whole(n, "the number of images"),
                             seed=_whole(seed, "the seed"), method=method, **init_fields)
    except InvalidRequest as e:
        if e.field == "prompts":
            raise UserError("enter a prompt or upload an image prompt") from e
        if e.field.startswith("prompts["):  # "prompts[i]": the i-th non-blank line
            index, part = e.field[len("prompts["):].split("]", 1)
            what = f"prompt line {numbered[int(index)][0]}" + (f" {part.lstrip('.')}" if part else "")  # its weight
            raise UserError(f"{what} {e.problem}") from e
        raise UserError(f"{_PAGE_NAMES.get(e.field, e.field)} {e.problem}") from e


def run_job(session: Session, job: Job, out_dir: Path, on_stage: Callable[[str], None] | None = None,
            on_evaluation: Callable[[], object] | None = None) -> tuple[list[Path], Timings]:
    """Generate the job's images into ``out_dir`` as out_NNNNN.png; returns their paths and the stage times.

    ``on_stage`` is called with "conditioning", "sampling" and "decoding" as each stage starts,
    ``on_evaluation`` after each U-Net evaluation.
    """
    from ccld_trt import jobs

    result = jobs.run(session.backend, job, on_evaluation, on_stage)
    timings = Timings(result.seconds["conditioning"], result.seconds["sampling"], result.seconds["decoding"],
                      job.request.evaluations)
    return save_images(result.pixels, out_dir), timings


def _job_dir(root: Path) -> Path:
    """An empty directory for one job's PNGs under ``root``, after removing those of earlier jobs.

    The queue runs one job at a time, and Gradio copies a job's files into its own cache before it answers,
    so by the time the next job starts, nothing reads the earlier ones.
    """
    for old in root.iterdir():
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root))


def generate_for_page(loader: ModelLoader, work_dir: Path, prompts: Any, image: Any, image_weight: Any, steps: Any,
                      method: Any, seed: Any, n: Any, autoencoder_scale: Any,
                      progress: Callable[..., object] | None = None, *, init: Any = None,
                      strength: Any = None) -> tuple[list[str], list[str], str]:
    """What the page's Generate button does with its raw values (see parse_job): the job's PNGs, written into a
    fresh directory under ``work_dir``, as (gallery paths, download paths, summary Markdown). UserError for bad
    input, or while the models are loading or after they failed to.

    ``progress`` is called as Gradio's progress tracker is: ``progress((done, total), desc=..., unit=...)`` per
    U-Net evaluation and ``progress(fraction, desc=stage)`` as each stage starts.
    """
    session = loader.session()
    job = parse_job(prompts, image, image_weight, steps, method, seed, n, autoencoder_scale,
                    image_size=session.image_size, init=init, strength=strength)
    done, total = 0, job.request.evaluations
    report = progress if progress is not None else (lambda *args, **kwargs: None)  # gr.Progress is falsy

    def evaluated() -> None:
        nonlocal done
        loader.check_running()  # a stopping server cancels the job here, so Ctrl-C waits one evaluation at most
        done += 1
        report((done, total), desc="sampling", unit="U-Net evaluations")

    def started(stage: str) -> None:
        loader.check_running()
        report(0.0 if stage == "conditioning" else done / total, desc=stage)

    with loader.job():
        paths, timings = run_job(session, job, _job_dir(work_dir), started, evaluated)
        loader.check_running()  # a stopping server removes the work directory: a cancelled job shows no images
    images = [str(p) for p in paths]
    request = job.request
    summary = (f"{timings.markdown()}  \n{request.n} image(s), seed {request.seed}, {request.steps} steps "
               f"of {request.method}, {loader.description}")
    if request.init is not None:  # only the steps below the strength ran
        summary += f"  \nfrom the init image at strength {request.strength:g} ({len(request.timesteps())} steps)"
    if session.demo:
        summary += "  \n**Random demo weights: these images are noise by design.**"
    return images, images, summary


def _no_analytics() -> None:
    # Gradio reads this when it is first imported: the server must not report usage anywhere.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def preset_fields(name: str) -> tuple[int, str]:
    """A preset button of the page: that preset's (steps, sampler), as ``sample --preset NAME``."""
    method, steps = PRESETS[name]
    return steps, method


def build_app(loader: ModelLoader, demo_weights: bool, work_dir: Path) -> gr.Blocks:
    """The page and its API (``/generate``). ``work_dir`` holds the PNGs of the latest job."""
    _no_analytics()
    import gradio as gr

    def on_generate(prompts: Any, image: Any, image_weight: Any, steps: Any, method: Any, seed: Any, n: Any,
                    autoencoder_scale: Any, init: Any = None, strength: Any = None,
                    progress: gr.Progress = gr.Progress(),  # noqa: B008 (how Gradio asks to inject a tracker)
                    ) -> tuple[list[str], list[str], str]:
        try:
            return generate_for_page(loader, work_dir, prompts, image, image_weight, steps, method, seed, n,
                                     autoencoder_scale, progress, init=init, strength=strength)
        except UserError as e:
            raise gr.Error(str(e), duration=None, print_exception=False) from e
        except Exception as e:  # the page must get an answer; the traceback goes to the server log
            logger.exception("generation failed")
            raise gr.Error(f"internal error: {type(e).__name__}: {e} (details in the server log)",
                           duration=None) from e

    def poll() -> tuple[str, Any]:
        return loader.status_markdown(), gr.Timer(active=not loader.finished)

    with gr.Blocks(title="ccld-trt", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("# ccld-trt — CLOOB-conditioned latent diffusion")
        if demo_weights:
            gr.HTML(f'<div id="demo-warning" style="background:#b91c1c;color:#fff;padding:12px 16px;'
                    f'border-radius:8px;font-size:1.15em;font-weight:700">{DEMO_WARNING}</div>')
        status = gr.Markdown(loader.status_markdown(), elem_id="model-status")
        with gr.Row():
            with gr.Column():
                prompts = gr.Textbox(label="Prompts", lines=3, elem_id="prompts",
                                     info="one per line, TEXT or TEXT:WEIGHT (weight 3 if omitted)",
                                     placeholder="a watercolor painting of a lighthouse at dusk:3")
                with gr.Row():
                    image = gr.Image(label="Image prompt (optional)", type="filepath", image_mode=None,
                                     sources=["upload", "clipboard"], elem_id="image-prompt")
                    image_weight = gr.Number(3.0, label="Image prompt weight", elem_id="image-weight")
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=50, step=1, label="Steps", elem_id="steps")
                    method = gr.Dropdown(list(METHODS), value="plms", label="Sampler", elem_id="sampler")
                    with gr.Column(min_width=160):  # the preset buttons, stacked beside steps and sampler
                        presets = {name: gr.Button(f"{name.capitalize()}: {m}, {k} steps", elem_id=name, size="sm")
                                   for name, (m, k) in PRESETS.items()}
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                    n = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images", elem_id="n")
                    scale = gr.Number(DEFAULT_AUTOENCODER_SCALE, label="Autoencoder scale", elem_id="scale",
                                      info="latents × this before decoding (2.55, as the published demo)")
                with gr.Row():
                    init = gr.Image(label="Init image (optional: image to image)", type="filepath", image_mode=None,
                                    sources=["upload", "clipboard"], elem_id="init-image")
                    strength = gr.Slider(0.01, 1.0, value=DEFAULT_STRENGTH, step=0.01, label="Strength",
                                         elem_id="strength", info="with an init image: the timestep to start at; "
                                         "lower keeps more of the image")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Images", format="png", elem_id="gallery",
                                     buttons=["download", "fullscreen"])
                files = gr.File(label="Download PNGs", file_count="multiple", elem_id="files")
                timings = gr.Markdown(elem_id="timings")
        # Raw inputs (preprocess=False): Gradio's image preprocessing would open the upload before the size
        # and format checks of parse_job, and its errors reach the page only as a bare "Error".
        button.click(on_generate, inputs=[prompts, image, image_weight, steps, method, seed, n, scale, init, strength],
                     outputs=[gallery, files, timings], api_name="generate", preprocess=False,
                     concurrency_limit=1, concurrency_id="device")
        # a preset (as `sample --preset`) only sets the sampler and steps shown, which the user may change
        for name, preset_button in presets.items():
            preset_button.click(functools.partial(preset_fields, name), outputs=[steps, method], queue=False,
                                api_visibility="private")
        timer = gr.Timer(1.0, active=not loader.finished)
        timer.tick(poll, outputs=[status, timer], queue=False, api_visibility="private")
        app.load(poll, outputs=[status, timer], queue=False, api_visibility="private")
    app.queue(default_concurrency_limit=1, max_size=32)
    return app


def serve(options: BackendOptions, models: ModelSource, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          allow_remote: bool = False, keys: Keys | None = None, insecure: bool = False) -> None:
    """Serve the page at http://host:port until SIGINT (Ctrl-C) or SIGTERM, running the networks of ``models`` as
    ``options`` say; then cancel the running job, close the server and remove the work directory, in
    STOP_BUDGET_S, whatever signal dispositions the process inherited (stopping.StopSignals). With ``keys``, the
    page asks for one as the password (any user name); a host other machines can reach needs ``allow_remote``
    (--listen) and keys or ``insecure`` (access.check_exposure). Call it from the main thread."""
    keys = keys or Keys()
    warning = check_exposure(host, allow_remote, keys, insecure)
    if warning:
        print(warning, file=sys.stderr)
    options = options.resolved()  # a combination that cannot run here fails now, not in the page
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be from 1 to 65535, got {port}")
    files = models.files
    files.check_present()
    demo_weights = files.is_demo()
    if demo_weights:
        print("warning: these are RANDOM DEMO WEIGHTS: images will be noise-like, not paintings", file=sys.stderr)
    # Then PIL refuses, in Image.open, anything over twice the upload limit wherever this process opens it.
    Image.MAX_IMAGE_PIXELS = MAX_UPLOAD_PIXELS
    # every graph exported at start-up, off the requests' path (an image prompt's encoder included)
    loader = ModelLoader(lambda: open_session(options, models, graphs=BACKEND_GRAPHS), options.describe())
    # The handlers first: a signal while Gradio imports or the port opens stops the server as soon as it is up.
    # Gradio's import makes objects that live until exit: the collector skips them (collector.start_up)
    with collector.start_up() as started, StopSignals("ccld-trt serve", exit_within=LAST_RESORT_S) as stop, \
            tempfile.TemporaryDirectory(prefix="ccld-trt-serve-", ignore_cleanup_errors=True) as work_dir:
        app = build_app(loader, demo_weights, Path(work_dir))
        import gradio as gr

        # The system's fonts: Chromium draws bold text in Gradio's bundled Source Sans with mismatched glyphs.
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                  font_mono=["ui-monospace", "monospace"])
        try:
            # run_history=False: no record of jobs, and no offer to copy them to a Hugging Face bucket.
            app.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                       max_file_size=MAX_UPLOAD_BYTES, theme=theme, run_history=False, prevent_thread_lock=True,
                       auth=page_login(keys) if keys else None,
                       auth_message="Any user name; the password is an API key of this server." if keys else None)
        except OSError as e:
            raise UserError(f"cannot serve on {host}:{port}: {e}") from e
        started()
        loader.start()  # once the port is ours, so that a refused start loads nothing
        try:
            stop.wait()
        finally:
            stop_page(app, loader, time.monotonic() + STOP_BUDGET_S)


def stop_page(app: gr.Blocks, loader: ModelLoader, deadline: float) -> None:
    """The clean-up after a stop request, done by ``deadline`` (time.monotonic): cancel the running job (it stops
    at its next U-Net evaluation or stage), close the HTTP server (the job's open event stream holds that up until
    the job ends), wait for the job. A job still running at the deadline ends with the process; what happened is
    said on stderr. The work directory is removed after this, by serve."""
    loader.cancel()
    bounded(lambda: app.close(verbose=False), max(0.0, deadline - time.monotonic()),
            "ccld-trt serve: closing the HTTP server")
    if loader.stop(max(0.0, deadline - time.monotonic())):
        print("ccld-trt serve: stopped (no job left running)", file=sys.stderr)
    else:
        print(f"ccld-trt serve: stopped; the running job did not reach its next U-Net evaluation within "
              f"{STOP_BUDGET_S:g} s of the signal and ends with the process", file=sys.stderr)
