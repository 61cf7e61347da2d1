"""The trained proxy U-Net (docs/proxy.md): its compact file is the original-format network, it has learned the
held-out photo better than its untrained copy, and the fast preset converges on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ccld_trt.benchmarks import proxy_data, proxy_measure, proxy_train
from ccld_trt.export.models import ModelFiles, load_networks
from ccld_trt.export.unet import DiffusionModel, infer_unet_config
from ccld_trt.pipeline import sample_latents
from ccld_trt.runner import BackendOptions, ModelSource, open_session
from ccld_trt.sampler_names import FAST_METHOD, FAST_STEPS, PRESETS

# Floors the measurement supports (docs/proxy.md: one image, the 100-step reference this test recomputes; the
# measured values less ~3 dB for thread-count rounding): the fast preset measured 29.8 dB, far under the 35 dB the
# issue asks and the 53 dB the mixture oracle gave; the balanced preset is the cheapest cell above 35 dB on both
# the proxy and the oracle.
FAST_PRESET_FLOOR_DB = 27.0
PROPOSED_PRESET = PRESETS["balanced"]
PROPOSED_FLOOR_DB = 40.0  # balanced (dpmpp-3m/15): 45.3 dB on this image, 45.4 mean over four (docs/proxy.md)
# The target: held-out v-loss at most half the untrained network's.
LEARNED_RATIO = 0.5


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return proxy_train.materialize(proxy_measure.COMPACT, tmp_path_factory.mktemp("proxy") / "models")


def test_compact_file_is_the_trained_network() -> None:
    """The compact form (fp16 values, FiLM as u @ v, mapping rebuilt from the seed) computes what the network
    being trained computes, once its values are rounded to fp16 as the file stores them."""
    recipe = proxy_train.Recipe()
    model = proxy_train.student(recipe)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".u"):  # zero at initialisation: give FiLM something to do
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            p.copy_(p.half().float()) if not name.startswith("mapping.") else None
    full = DiffusionModel(recipe.base_channels, list(recipe.channel_multipliers))
    full.load_state_dict(proxy_train.full_state(proxy_train.compact_state(model), recipe))
    x, t, embed = torch.randn(2, 4, 32, 32, generator=gen), torch.tensor([0.3, 0.9]), torch.randn(2, 512, generator=gen)
    with torch.no_grad():
        expected, got = model.eval()(x, t, embed), full.eval()(x, t, embed)
    assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    assert float(got.std()) > 0.05  # not a vacuous match of two zero outputs


def test_latent_channels_round_trip_to_rgb() -> None:
    rgb = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    back = proxy_data.latent_to_rgb(proxy_data.rgb_to_latent(rgb))
    torch.testing.assert_close(back, rgb, atol=1e-5, rtol=0)


def test_materialized_proxy_loads_like_the_real_files(proxy_dir: Path) -> None:
    files = ModelFiles.resolve(proxy_dir)
    assert not files.is_demo()
    networks = load_networks(files)
    state = networks.unet.state_dict()
    assert infer_unet_config(state) == (64, [1, 1, 1, 1])
    assert networks.checkpoint_autoencoder_scale == 1.0


def test_held_out_loss_is_below_half_the_untrained_copys(proxy_dir: Path) -> None:
    recipe = proxy_train.Recipe()
    photos = proxy_data.load_photos(proxy_data.photo_paths())
    held = proxy_data.random_crops(photos[-proxy_data.HELD_OUT:], 16, recipe.seed + 1)
    encoder = load_networks(ModelFiles.resolve(proxy_dir)).image_encoder
    with torch.no_grad():
        embeds = encoder(held.prompts)
    trained = load_networks(ModelFiles.resolve(proxy_dir)).unet
    untrained = proxy_train.student(recipe).eval()
    loss = proxy_train.held_out_loss(trained, held, embeds, recipe.seed, chunk=16)
    initial = proxy_train.held_out_loss(untrained, held, embeds, recipe.seed, chunk=16)
    assert loss <= LEARNED_RATIO * initial, (loss, initial)


@pytest.mark.slow  # ~120 U-Net evaluations: ~45 s on an idle 2-core CPU
def test_fast_presets_against_the_converged_endpoint(proxy_dir: Path) -> None:
    """The fast preset and the balanced one against the converged endpoint from the same noise, one image."""
    session = open_session(BackendOptions("torch", "cpu", "fp32").resolved(),
                           ModelSource(ModelFiles.resolve(proxy_dir)))
    prompt = proxy_measure.held_out_prompt()
    backend, size = session.backend, session.image_size
    reference = proxy_measure.converged(backend, size, prompt, steps=100, n=1)
    conds, weights = prompt.conds(backend, size)
    fast = sample_latents(backend, prompt.request(FAST_METHOD, FAST_STEPS, 1), conds, weights)
    proposed = sample_latents(backend, prompt.request(*PROPOSED_PRESET, 1), conds, weights)
    fast_db, proposed_db = proxy_measure.psnr(fast, reference), proxy_measure.psnr(proposed, reference)
    assert fast_db >= FAST_PRESET_FLOOR_DB, fast_db
    assert proposed_db >= PROPOSED_FLOOR_DB, proposed_db
