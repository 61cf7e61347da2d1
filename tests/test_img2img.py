"""Image to image (``--init``, ``--strength``): the original ``cfg_sample.py``'s semantics (timesteps below the
starting timestep, the init latent noised to the first of them with the first noise draw), every sampler and
batching, the same images on torch and onnxruntime (and openvino fp32), the encoder graph's shapes and
profile, and bad init images as one line."""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccld_trt.backends.torch_backend import TorchBackend
from ccld_trt.cli import run
from ccld_trt.engines.profiles import ProfileParams, graph_profile
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import ENCODER
from ccld_trt.export.models import ModelFiles, Networks, load_networks
from ccld_trt.export.shapes import output_shapes
from ccld_trt.init_image import encode_init, load_init_image
from ccld_trt.pipeline import (
    DEFAULT_AUTOENCODER_SCALE,
    InvalidRequest,
    Request,
    conditions,
    generate,
    sample_latents,
)
from ccld_trt.sampler_names import METHODS
from ccld_trt.schedule import method_timesteps, sampling_timesteps
from test_e2e import rel_error  # tests/ is on sys.path under pytest's default import mode

FIXTURES = Path(__file__).resolve().parent / "fixtures"
INIT = FIXTURES / "image_prompt.png"
PROMPTS = [("a lighthouse at dusk", 3.0)]


@pytest.fixture(scope="module")
def networks(seed3_dir: Path) -> Networks:
    return load_networks(ModelFiles.resolve(seed3_dir))


@pytest.fixture(scope="module")
def torch_backend(networks: Networks) -> TorchBackend:
    return TorchBackend(networks)


def img2img(**fields: object) -> Request:
    return Request(prompts=PROMPTS, init=INIT, **fields)  # type: ignore[arg-type]


def test_strength_keeps_the_timesteps_below_it() -> None:
    """Analytic: below the splice, the schedule is t * (1 + 0.80074257 - 0.48536712); of 10 steps, t = 0.4 ..
    0.1 map below 0.6 (t = 0.5 maps to 0.658)."""
    scale = 1 + 0.80074257 - 0.48536712
    got = img2img(steps=10, strength=0.6).timesteps()
    np.testing.assert_allclose(got.numpy(), [0.4 * scale, 0.3 * scale, 0.2 * scale, 0.1 * scale], rtol=1e-6)
    assert img2img(steps=10, strength=0.6).evaluations == 3 * 4 + 1  # plms: 3 PRK steps of 4, then 1 each
    assert Request(prompts=PROMPTS, steps=10, strength=0.6).timesteps().shape == (10,)  # no init: all of them


@pytest.mark.parametrize("method", METHODS)
def test_strength_one_keeps_every_timestep(method: str) -> None:
    """Every timestep is below 1, so starting timestep 1.0 runs the text-to-image timesteps (the first is
    spliced(1) = 0.9957, not 1)."""
    assert torch.equal(img2img(steps=12, strength=1.0, method=method).timesteps(), method_timesteps(method, 12))


def test_alpha_at_the_first_timestep_is_not_zero() -> None:
    """Why strength 1.0 needs its own rule to be exactly text-to-image: the spliced schedule starts at
    log-SNR -log(expm1(1e-4 + 10)), where alpha = sqrt(sigmoid(log_snr)) = 0.00674, not 0."""
    log_snr = -math.log(math.expm1(1e-4 + 10))
    alpha = math.sqrt(1 / (1 + math.exp(-log_snr)))
    first = float(sampling_timesteps(50)[0])
    assert math.cos(first * math.pi / 2) == pytest.approx(alpha, rel=1e-4)
    assert alpha == pytest.approx(0.00674, abs=1e-5)


class _FirstInput:
    """A stand-in Backend whose U-Net records the x of its first evaluation and returns v = 0."""

    name = "stub"
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.first: torch.Tensor | None = None

    def unet(self, x: torch.Tensor, t: torch.Tensor, conds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            self.first = x.clone()
        return torch.zeros_like(x)


@pytest.mark.parametrize("method", ["plms", "ddpm"])
def test_the_start_is_the_init_noised_with_the_first_draw(method: str) -> None:
    """x0 = init * cos(pi/2 t0) + randn(seed)[n, 4, h, w] * sin(pi/2 t0), t0 the first timestep below strength:
    the original's order (manual_seed, then the starting noise for all n images)."""
    request = img2img(steps=20, strength=0.7, n=3, seed=5, method=method, latent_size=(4, 6))
    init = torch.randn([1, 4, 4, 6], generator=torch.Generator().manual_seed(9))
    stub = _FirstInput()
    sample_latents(stub, request, torch.zeros([2, 512]), torch.tensor([-2.0, 3.0]), init_latent=init)  # type: ignore[arg-type]
    t0 = float(spliced_first_below(20, 0.7))
    noise = torch.randn([3, 4, 4, 6], generator=torch.Generator().manual_seed(5))
    expected = init * math.cos(t0 * math.pi / 2) + noise * math.sin(t0 * math.pi / 2)
    assert stub.first is not None
    torch.testing.assert_close(stub.first, expected, rtol=1e-6, atol=1e-6)


def spliced_first_below(steps: int, start: float) -> float:
    return float(next(t for t in sampling_timesteps(steps).tolist() if t < start))


@pytest.mark.parametrize("method", METHODS)
def test_every_sampler_batches_in_the_original_seed_order(method: str, torch_backend: TorchBackend) -> None:
    """n = 2 in one batch and in batches of 1 give the same images, from an init, with the evaluations the
    request announces (ddpm and ddim with eta draw one noise per step below the strength)."""
    init = encode_init(torch_backend, load_init_image(INIT, (16, 16)), DEFAULT_AUTOENCODER_SCALE)
    outs = []
    for batch_size in (None, 1):
        request = img2img(steps=5, strength=0.8, n=2, seed=1, method=method, batch_size=batch_size,
                          eta=0.5 if method == "ddim" else 0.0, latent_size=(16, 16))
        request.validate()
        calls: list[int] = []
        conds, weights = conditions(torch_backend, request, [])
        outs.append(sample_latents(torch_backend, request, conds, weights, partial(calls.append, 1), init))
        assert len(calls) == request.evaluations
        assert 1 < len(request.timesteps()) < 5
    assert torch.isfinite(outs[0]).all()
    # float32 GEMMs sum in a batch-size-dependent order on some CPUs (up to 4e-5 per element seen on a Zen 4),
    # so compare the whole tensor: a wrong seed order or noise draw is off by order 1, not 1e-5
    assert float((outs[1] - outs[0]).norm() / outs[0].norm()) <= 1e-5


def test_strength_one_is_exactly_text_to_image(torch_backend: TorchBackend) -> None:
    """Strength 1.0 starts from the noise alone (the init would enter at alpha 0.0067 only): the text-to-image
    latents exactly; a lower strength moves them."""
    size = {"steps": 8, "method": "ddim", "latent_size": (16, 16)}
    text = generate(torch_backend, Request(prompts=PROMPTS, **size), [], DEFAULT_AUTOENCODER_SCALE)  # type: ignore[arg-type]
    one = generate(torch_backend, img2img(strength=1.0, **size), [], DEFAULT_AUTOENCODER_SCALE)
    half = generate(torch_backend, img2img(strength=0.5, **size), [], DEFAULT_AUTOENCODER_SCALE)
    assert torch.equal(one.latents, text.latents)
    np.testing.assert_array_equal(one.pixels, text.pixels)
    assert rel_error(half.latents.numpy(), text.latents.numpy()) > 0.05


def test_init_image_is_resized_and_centre_cropped(tmp_path: Path) -> None:
    """A 60x20 image of red, green and blue thirds, to latents 2x2 (16x16 pixels): scaled to 48x16 and
    centre-cropped, only the green third remains; pixels in [-1, 1]."""
    image = np.zeros([20, 60, 3], np.uint8)
    image[:, :20, 0] = image[:, 20:40, 1] = image[:, 40:, 2] = 255
    Image.fromarray(image).save(tmp_path / "thirds.png")
    pixels = load_init_image(tmp_path / "thirds.png", (2, 2))
    assert pixels.shape == (1, 3, 16, 16) and pixels.dtype == torch.float32
    inner = pixels[0, :, :, 2:-2]  # LANCZOS rings at the cut edges
    torch.testing.assert_close(inner.mean((1, 2)), torch.tensor([-1.0, 1.0, -1.0]), atol=0.02, rtol=0)


def test_bad_init_images_are_one_line(tmp_path: Path, seed3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    for init, message in ((tmp_path / "notes.png", "not a readable image"),
                          (tmp_path / "missing.png", "init image not found"),
                          ("https://example.com/cat.png", "URLs are not fetched")):
        assert run(["sample", "a cat", "--init", str(init), "--models", str(seed3_dir),
                    "--output-dir", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ccld-trt: error: ") and message in err, err
    for flags, message in ((["--init", str(INIT), "--strength", "0"], "--strength must be in (0, 1], got 0.0"),
                           (["--strength", "0.5"], "--strength is for image-to-image"),
                           (["--init", str(INIT), "--starting-timestep", "0.01"], "--strength 0.01 is below every")):
        assert run(["sample", "a cat", *flags, "--models", str(seed3_dir), "--output-dir", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_invalid_strength_names_the_field() -> None:
    with pytest.raises(InvalidRequest, match=r"strength must be in \(0, 1\], got 1.5") as e:
        img2img(strength=1.5).validate()
    assert e.value.field == "strength"
    Request(prompts=PROMPTS, strength=1.5).validate()  # no init: the strength is not used
    with pytest.raises(UserError, match="init image not found"):
        load_init_image(FIXTURES / "missing.png", (32, 32))


def test_encoder_graph_shapes_and_engine_profile() -> None:
    assert output_shapes(ENCODER, {"images": (2, 3, 64, 48)}) == {"latents": (2, 4, 8, 6)}
    with pytest.raises(ValueError, match="8\\*width must be a multiple of 8"):
        output_shapes(ENCODER, {"images": (2, 3, 64, 50)})
    profile = graph_profile("encoder", ProfileParams(batch=(1, 2, 4), height=(16, 32, 64), width=(32, 32, 32)))
    assert profile == {"images": ((1, 3, 128, 256), (2, 3, 256, 256), (4, 3, 512, 256))}


def test_torch_onnxruntime_and_openvino_make_the_same_images(seed3_dir: Path, networks: Networks,
                                                             torch_backend: TorchBackend,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same init, prompt and seed on the exported graphs (encoder included): latents rel <= 1e-3 and pixels
    within 2 of torch's, the golden tolerances; openvino at fp32 too when it is installed."""
    from ccld_trt.backends.onnxruntime_backend import OnnxRuntimeBackend
    from test_onnx import export_seed3

    _, onnx_dir = export_seed3(seed3_dir, tmp_path_factory, networks)  # up to date when test_onnx ran first
    request = img2img(steps=8, strength=0.7, n=2, seed=2, method="plms")
    pixels = load_init_image(INIT, request.latent_size)
    want = generate(torch_backend, request, [], DEFAULT_AUTOENCODER_SCALE, init_pixels=pixels)
    backends = [OnnxRuntimeBackend(onnx_dir)]
    try:
        from ccld_trt.backends.openvino_backend import OpenVinoBackend

        backends.append(OpenVinoBackend(onnx_dir, "fp32"))  # type: ignore[arg-type]
    except UserError:  # OpenVINO not installed
        pass
    for backend in backends:
        got = generate(backend, request, [], DEFAULT_AUTOENCODER_SCALE, init_pixels=pixels)
        assert rel_error(got.latents.numpy(), want.latents.numpy()) <= 1e-3, backend.name
        assert np.abs(got.pixels.astype(int) - want.pixels.astype(int)).max() <= 2, backend.name
    # the encoder itself: graph vs torch on the init image (the export's own check uses random images)
    with torch.inference_mode():
        assert rel_error(backends[0].encode_latents(pixels).numpy(), networks.encoder(pixels).numpy()) <= 1e-4


def _png(width: int = 40, height: int = 24) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_cluster_api_takes_an_init_image_with_the_image_prompts_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    import json

    from ccld_trt import jobs
    from ccld_trt.cluster.api import BadRequest, parse_generate

    def body(**fields: object) -> bytes:
        return json.dumps({"prompts": ["a cat"], "steps": 10, **fields}).encode()

    job = parse_generate(body(init_image=base64.b64encode(_png()).decode(), strength=0.6), 64)
    assert job.request.strength == 0.6 and job.request.init is not None
    assert job.init_pixels is not None and job.init_pixels.shape == (1, 3, 256, 256)
    torch.testing.assert_close(job.init_pixels[0, :, 100, 100], torch.tensor([200, 30, 30]) / 127.5 - 1)
    monkeypatch.setattr(jobs, "MAX_UPLOAD_PIXELS", 500)  # 40 x 24 = 960 pixels
    for fields, message in (
            ({"init_image": base64.b64encode(_png()).decode()}, "the init image is 40x24 (0.0 megapixels); the limit"),
            ({"init_image": "not base64!"}, "init_image is not valid base64"),
            ({"init_image": base64.b64encode(b"GIF89a but not really").decode()},
             "the init image is not an image in a supported format"),
            ({"init_image": 3}, "init_image must be a base64 PNG/JPEG string"),
            ({"strength": 0.5}, "strength is for image-to-image"),
            ({"init_image": base64.b64encode(_png(8, 8)).decode(), "strength": 2}, "strength must be in (0, 1]")):
        with pytest.raises(BadRequest) as e:
            parse_generate(body(**fields), 64)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_page_takes_an_init_image(tmp_path: Path) -> None:
    from ccld_trt.serve import parse_job

    (tmp_path / "init.png").write_bytes(_png())
    job = parse_job("a cat", None, 3.0, 10, "plms", 0, 1, 2.55, image_size=64,
                    init={"path": str(tmp_path / "init.png")}, strength=0.5)
    assert job.request.strength == 0.5 and job.init_pixels is not None and job.init_pixels.shape == (1, 3, 256, 256)
    (tmp_path / "bad.png").write_text("no")
    with pytest.raises(UserError, match="the init image is not an image in a supported format") as e:
        parse_job("a cat", None, 3.0, 10, "plms", 0, 1, 2.55, image_size=64, init={"path": str(tmp_path / "bad.png")},
                  strength=0.5)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="the strength must be in"):
        parse_job("a cat", None, 3.0, 10, "plms", 0, 1, 2.55, image_size=64, init={"path": str(tmp_path / "init.png")},
                  strength=0)


def test_page_handler_makes_the_pipelines_images_from_an_init(networks: Networks, torch_backend: TorchBackend,
                                                               tmp_path: Path) -> None:
    """The Generate button with an init image: its PNGs equal the pipeline's on the same job, and the summary
    says how many steps ran from the init."""
    from ccld_trt.runner import Session
    from ccld_trt.serve import ModelLoader, generate_for_page, parse_job

    loader = ModelLoader(lambda: Session(torch_backend, networks.image_size, 2.55, True), "torch on cpu")
    loader.start()
    for _ in range(600):
        if loader.finished:
            break
        time.sleep(0.1)
    values = ("a cat", None, 3.0, 4, "ddim", 0, 1, 2.55)
    init = {"path": str(INIT)}
    _, files, summary = generate_for_page(loader, tmp_path, *values, init=init, strength=0.7)
    job = parse_job(*values, image_size=networks.image_size, init=init, strength=0.7)
    solo = generate(torch_backend, job.request, [], 2.55, init_pixels=job.init_pixels)
    assert len(files) == 1 and np.array_equal(np.asarray(Image.open(files[0])), solo.pixels[0])
    assert "from the init image at strength 0.7 (2 steps)" in summary


def test_cluster_replica_runs_init_requests_merged_with_others(seed3_dir: Path, torch_backend: TorchBackend) -> None:
    """An image-to-image request and a text one at the same time on one replica (their U-Net evaluations
    merged, at different timesteps): each answer equals the pipeline's images for its own job."""
    import base64
    import concurrent.futures
    import json

    from ccld_trt.cluster.api import decode_png, latents_from_json, parse_generate
    from ccld_trt.cluster.replica import Replica, ReplicaSettings
    from ccld_trt.runner import BackendOptions, ModelSource

    bodies = [json.dumps({"prompts": ["a cat"], "steps": 6, "method": "ddim", "seed": 1, "n": 2,
                          "return_latents": True, **extra}).encode()
              for extra in ({"init_image": base64.b64encode(INIT.read_bytes()).decode(), "strength": 0.8}, {})]
    replica = Replica(BackendOptions("torch"), ModelSource(ModelFiles.resolve(seed3_dir)), ReplicaSettings())
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda b: replica.handle("POST", "/v1/generate", b), bodies))
        assert replica.stats()["merged_calls"] > 0
    finally:
        replica.close()
    for raw, (status, answer) in zip(bodies, answers, strict=True):
        assert status == 200, answer
        job = parse_generate(raw, 64)
        solo = generate(torch_backend, job.request, [], job.autoencoder_scale, init_pixels=job.init_pixels)
        assert rel_error(latents_from_json(answer["latents"]), solo.latents.numpy()) <= 1e-5
        pixels = np.stack([decode_png(image) for image in answer["images"]])
        assert np.abs(pixels.astype(int) - solo.pixels.astype(int)).max() <= 1
