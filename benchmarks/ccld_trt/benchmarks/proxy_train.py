"""Train the proxy: the project's U-Net (``DiffusionModel``) at base 64, multipliers [1, 1, 1, 1], on photo crops
(``proxy_data``), with the v-objective on the cosine schedule and classifier-free dropout of its conditioning.

``python -m ccld_trt.benchmarks.proxy_train OUT_DIR`` retrains it from the recipe below (fixed seed, one thread;
~2 min on an idle core, 6.4 min on the loaded 2-core CPU) and writes OUT_DIR/proxy_unet.safetensors (the compact form),
loss.csv, loss.png and recipe.json. ``materialize(compact, models_dir)`` turns the compact file into a models
directory the tools load (``--models``): model_student.ckpt in the original format beside the small demo
autoencoder and CLOOB.

Why a compact form: at this width the U-Net still has 15.6 M parameters, 12.7 M of them in the 1024-wide layers
that every width shares (the mapping network and the FiLM projections). To keep the committed file a few MB, the
mapping network stays at its seeded demo initialisation (frozen: a fixed random-feature embedding of t and the
CLOOB vector, rebuilt from the seed) and each FiLM projection is trained as a rank-``MOD_RANK`` product; the rest
(every conv, attention and norm) is trained in full. The file stores float16 values; the proxy *is* those values.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ccld_trt.benchmarks.proxy_data import Crops, train_and_held_out
from ccld_trt.export.demo_weights import init_tensor, write_demo_weights
from ccld_trt.export.models import DEMO_MARKER, UNET_FILE
from ccld_trt.export.unet import COND_DIM, DiffusionModel, Modulation2d
from ccld_trt.schedule import t_to_alpha_sigma

COMPACT_FILE = "proxy_unet.safetensors"
PROXY_MARKER = "PROXY_WEIGHTS.txt"


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the proxy (with the pinned photos of proxy_data)."""

    base_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 1, 1, 1)
    mod_rank: int = 8
    seed: int = 0
    steps: int = 80
    batch: int = 16
    lr: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    cond_dropout: float = 0.2  # fraction of training examples with the all-zero (unconditional) embedding
    n_train: int = 1024
    n_held_out: int = 64
    threads: int = 1
    demo_seed: int = 0  # the demo CLOOB whose image tower encodes the conditioning, and the frozen mapping network


class LowRankLinear(nn.Module):
    """Bias-free linear map [.., f_in] -> [.., f_out] with weight ``u @ v`` (u [f_out, r] zero-initialised)."""

    def __init__(self, f_in: int, f_out: int, rank: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(f_out, rank))
        self.v = nn.Parameter(torch.randn(rank, f_in) / math.sqrt(f_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u)


def student(recipe: Recipe) -> DiffusionModel:
    """The network as it is trained: seeded torch init, frozen seeded mapping network, low-rank FiLM."""
    torch.manual_seed(recipe.seed)
    model = DiffusionModel(recipe.base_channels, list(recipe.channel_multipliers))
    for name, p in model.mapping.named_parameters():
        p.data.copy_(torch.from_numpy(init_tensor(f"mapping.{name}", tuple(p.shape), recipe.demo_seed)))
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, Modulation2d):
            module.layer = LowRankLinear(COND_DIM, module.layer.out_features, recipe.mod_rank)  # type: ignore[assignment]
    return model


def compact_state(model: DiffusionModel) -> dict[str, torch.Tensor]:
    """What the committed file stores: every tensor but the mapping network's, as float16."""
    return {k: v.detach().half().contiguous() for k, v in model.state_dict().items()
            if not k.startswith("mapping.") and k != "autoencoder_scale"}


def full_state(compact: Mapping[str, torch.Tensor], recipe: Recipe) -> dict[str, torch.Tensor]:
    """The original-format U-Net state dict (float32) of a compact one: FiLM weights as u @ v, the mapping network
    rebuilt from the seed, ``autoencoder_scale`` 1 (the proxy's latents are already unit-std)."""
    shapes = {k: tuple(v.shape) for k, v in
              DiffusionModel(recipe.base_channels, list(recipe.channel_multipliers)).state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key.startswith("mapping."):
            state[key] = torch.from_numpy(init_tensor(key, shape, recipe.demo_seed))
        elif key == "autoencoder_scale":
            state[key] = torch.tensor(1.0)
        elif key.endswith(".layer.weight"):
            stem = key[: -len("weight")]
            state[key] = compact[stem + "u"].float() @ compact[stem + "v"].float()
        else:
            state[key] = compact[key].float()
    return state


def v_loss(model: nn.Module, x0: torch.Tensor, embed: torch.Tensor, t: torch.Tensor,
           noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the predicted velocity v = alpha * noise - sigma * x0 at x_t = alpha x0 + sigma noise.
    x0, noise [N, 4, H, W]; embed [N, 512]; t [N] in [0, 1]."""
    alpha, sigma = (s[:, None, None, None] for s in t_to_alpha_sigma(t))
    return F.mse_loss(model(alpha * x0 + sigma * noise, t, embed), alpha * noise - sigma * x0)


def held_out_loss(model: nn.Module, crops: Crops, embeds: torch.Tensor, seed: int, chunk: int = 64) -> float:
    """v-loss on the held-out crops at stratified t and seeded noise (the same draws for every model)."""
    gen = torch.Generator().manual_seed(seed + 7)
    n = len(crops.latents)
    t = (torch.arange(n) + torch.rand(n, generator=gen)) / n
    t = t[torch.randperm(n, generator=gen)]
    noise = torch.randn(crops.latents.shape, generator=gen)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, chunk):
            s = slice(i, i + chunk)
            total += float(v_loss(model, crops.latents[s], embeds[s], t[s], noise[s])) * len(t[s])
    return total / n


def image_encoder(recipe: Recipe, scratch: Path) -> nn.Module:
    """The demo CLOOB image tower (seed ``demo_seed``), as ``materialize`` ships it; pixels [N, 3, 64, 64] in [0, 1]
    -> unit embeddings [N, 512]."""
    from ccld_trt.export.cloob import load_cloob
    from ccld_trt.export.cloob_config import load_cloob_config

    if not (scratch / "cloob.pkl").exists():
        write_demo_weights(scratch, "small", recipe.demo_seed)
    _, image = load_cloob(scratch / "cloob.pkl", load_cloob_config(str(scratch / "cloob_config.json")))
    return image


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / (recipe.steps - recipe.warmup)))


def train(recipe: Recipe, out_dir: Path, log: Callable[[str], None] = print) -> dict[str, float]:
    """Train and write COMPACT_FILE, loss.csv, loss.png and recipe.json into ``out_dir``; returns the summary."""
    torch.set_num_threads(recipe.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_crops, held = train_and_held_out(recipe.n_train, recipe.n_held_out, recipe.seed)
    with tempfile.TemporaryDirectory() as scratch:
        encoder = image_encoder(recipe, Path(scratch))
    with torch.no_grad():
        train_embeds = torch.cat([encoder(p) for p in train_crops.prompts.split(256)])
        held_embeds = encoder(held.prompts)
    model = student(recipe)
    initial = held_out_loss(model, held, held_embeds, recipe.seed)
    log(f"held-out v-loss at initialisation {initial:.4f} ({time.perf_counter() - started:.0f} s)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    rows: list[dict[str, float]] = [{"step": 0, "train_loss": math.nan, "held_out_loss": initial, "seconds": 0.0}]
    model.train()
    for step in range(recipe.steps):
        idx = torch.randint(0, recipe.n_train, (recipe.batch,), generator=gen)
        keep = (torch.rand(recipe.batch, generator=gen) >= recipe.cond_dropout).float()[:, None]
        t = torch.rand(recipe.batch, generator=gen)
        noise = torch.randn(train_crops.latents[idx].shape, generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        loss = v_loss(model, train_crops.latents[idx], train_embeds[idx] * keep, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        row = {"step": step + 1, "train_loss": float(loss.detach()), "held_out_loss": math.nan,
               "seconds": time.perf_counter() - started}
        if (step + 1) % 40 == 0 or step + 1 == recipe.steps:
            model.eval()
            row["held_out_loss"] = held_out_loss(model, held, held_embeds, recipe.seed)
            model.train()
            log(f"step {step + 1}: train {float(loss.detach()):.4f}, held-out {row['held_out_loss']:.4f}, "
                f"{row['seconds']:.0f} s")
        rows.append(row)
    model.eval()
    from safetensors.torch import save_file

    save_file(compact_state(model), str(out_dir / COMPACT_FILE),
              metadata={"recipe": json.dumps(asdict(recipe))})
    # The proxy is the stored float16 values: its final loss is measured on them, in the original format.
    final_model = DiffusionModel(recipe.base_channels, list(recipe.channel_multipliers))
    from safetensors.torch import load_file

    final_model.load_state_dict(full_state(load_file(str(out_dir / COMPACT_FILE)), recipe))
    final = held_out_loss(final_model.eval(), held, held_embeds, recipe.seed)
    summary = {"held_out_loss_init": initial, "held_out_loss_final": final, "ratio": final / initial,
               "wall_seconds": time.perf_counter() - started}
    with open(out_dir / "loss.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "recipe.json").write_text(json.dumps({"recipe": asdict(recipe), "summary": summary}, indent=1) + "\n",
                                         encoding="utf-8")
    plot_loss(rows, out_dir / "loss.png")
    log(json.dumps(summary))
    return summary


def plot_loss(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows[1:]]
    train_loss = [r["train_loss"] for r in rows[1:]]
    window = 20
    smooth = [sum(train_loss[max(0, i - window + 1): i + 1]) / len(train_loss[max(0, i - window + 1): i + 1])
              for i in range(len(train_loss))]
    held = [(r["step"], r["held_out_loss"]) for r in rows if not math.isnan(r["held_out_loss"])]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, train_loss, color="0.8", lw=0.8, label="train (batch)")
    ax.plot(steps, smooth, color="C0", label=f"train ({window}-step mean)")
    ax.plot(*zip(*held, strict=True), "o-", color="C3", label="held-out photo")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("v-loss (MSE)")
    ax.set_title("proxy U-Net (base 64) on photo crops")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def materialize(compact_path: Path, models_dir: Path) -> Path:
    """A models directory for ``--models``: the proxy U-Net as model_student.ckpt (original format) beside the
    small demo autoencoder and the demo CLOOB its conditioning was encoded with. Refuses to overwrite."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(compact_path), framework="pt") as f:
        recipe_fields = json.loads((f.metadata() or {})["recipe"])
    recipe_fields["channel_multipliers"] = tuple(recipe_fields["channel_multipliers"])
    recipe = Recipe(**recipe_fields)
    write_demo_weights(models_dir, "small", recipe.demo_seed)
    # Our own freshly written demo U-Net is replaced: the rest of the directory is what the proxy was trained with.
    torch.save(full_state(load_file(str(compact_path)), recipe), models_dir / UNET_FILE)
    (models_dir / DEMO_MARKER).unlink()  # the U-Net is not random: reports must not call these demo weights
    (models_dir / PROXY_MARKER).write_text(
        f"model_student.ckpt is the trained proxy U-Net from {compact_path.name} (benchmarks/proxy, docs/proxy.md);\n"
        "the autoencoder and CLOOB are the random demo ones (`ccld-trt demo-weights --size small`, seed "
        f"{recipe.demo_seed}): decoded pixels are noise-like; proxy_data.latent_to_rgb shows the samples.\n",
        encoding="utf-8")
    return models_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ccld_trt.benchmarks.proxy_train", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="where the compact checkpoint, loss curve and recipe go")
    parser.add_argument("--steps", type=int, default=Recipe.steps, help=f"training steps (recipe: {Recipe.steps})")
    parser.add_argument("--threads", type=int, default=Recipe.threads, help="torch CPU threads")
    args = parser.parse_args(argv)
    if (args.out_dir / COMPACT_FILE).exists():
        print(f"error: {args.out_dir / COMPACT_FILE} exists; refusing to overwrite (choose another OUT_DIR)",
              file=sys.stderr)
        return 1
    train(Recipe(steps=args.steps, threads=args.threads), args.out_dir,
          log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
