"""Issue 21: every bad input is one line, said before any model loads or any sampling runs; work that fails anyway
(a full disk) leaves no half-written file and keeps what was written; the tokenizer's work is bounded.

The command line runs in-process with model loading and sampling replaced by tripwires, so a check that comes
too late fails the test instead of costing minutes. Cases as root use a read-only tmpfs, an immutable directory
and a lowered effective uid where the machine allows them (skipped with the reason otherwise)."""

from __future__ import annotations

import contextlib
import errno
import io
import locale
import math
import os
import random
import string
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ccld_trt import limits
from ccld_trt.cli import run
from ccld_trt.export.atomic import write_atomic
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import CONTEXT_LENGTH, EOT_TOKEN, SOT_TOKEN
from ccld_trt.outputs import check_new_file, check_output_dir, save_images, save_latents
from ccld_trt.pipeline import InvalidRequest, Request

FAST_S = 5.0  # a refusal takes well under this even on a busy 2-core CPU (the work it saves takes minutes)


# ---------------------------------------------------------------------------------------------------- files


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with an empty image stream (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("bad-images")
    paths = {"line": directory / "line.png", "bomb": directory / "bomb.png", "wide": directory / "wide.png"}
    Image.new("L", (1, 1_000_000)).save(paths["line"])  # 1 megapixel, but 224 x 224,000,000 once resized
    paths["bomb"].write_bytes(png_header_only(100_000, 100_000))
    Image.new("RGB", (40 * 10, 10), (200, 10, 10)).save(paths["wide"])  # 40:1, within the limit
    return paths


@contextlib.contextmanager
def read_only_tmpfs(base: Path) -> Iterator[Path]:
    mount = base / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@contextlib.contextmanager
def immutable_dir(base: Path) -> Iterator[Path]:
    directory = base / "immutable"
    directory.mkdir()
    done = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, text=True) \
        if _has("chattr") else None
    if done is None or done.returncode:
        pytest.skip(f"cannot make an immutable directory here: {done.stderr.strip() if done else 'no chattr'}")
    try:
        yield directory
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=False)


def _has(program: str) -> bool:
    return any(os.access(Path(d) / program, os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))


# ------------------------------------------------------------------------------------------ the command line


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model or sampling fails the test: each case must be refused before either."""
    def tripwire(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a bad input reached model loading or sampling")
    monkeypatch.setattr("ccld_trt.runner.load_networks", tripwire)
    monkeypatch.setattr("ccld_trt.pipeline.sample_latents", tripwire)


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI; assert it failed fast with one line on stderr and nothing on stdout; return that line."""
    start = time.perf_counter()
    status = run(list(argv))
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert status != 0 and len(lines) == 1 and not out, (status, out, err)
    assert seconds < FAST_S, seconds
    return lines[0]


CLI_CASES: dict[str, tuple[list[str], list[str]]] = {
    "scale nan": (["--autoencoder-scale", "nan"], ["--autoencoder-scale", "nan"]),
    "scale 0": (["--autoencoder-scale", "0"], ["--autoencoder-scale", "positive", "got 0"]),
    "scale -inf": (["--autoencoder-scale=-inf"], ["--autoencoder-scale", "-inf"]),
    "scale huge": (["--autoencoder-scale", "1e9"], ["--autoencoder-scale", "at most 100"]),
    "weights overflow": (["a:3e38", "b:3e38"], ["weight", "from -100 to 100", "3e+38"]),
    "absurd weight": (["x:-1e30"], ["weight", "from -100 to 100", "-1e+30"]),
    "image weight": (["--images", "IMAGE:1e30"], ["image_prompts[0].weight", "from -100 to 100"]),
    "n": (["-n", "100000"], ["-n", "from 1 to 16", "100000"]),
    "ddpm steps": (["--method", "ddpm", "--steps", "2000000"], ["--steps", "from 1 to 1000", "2000000"]),
    "base channels": (["--base-channels", "10000000"], ["base channels", "from 1 to 2048", "10000000"]),
    "multipliers": (["--channel-multipliers", "1,1,2,100000"], ["level width", "at most 2048"]),
    "many prompts": ([f"p{i}" for i in range(9)], ["prompts", "at most 8", "got 9"]),
    "line image": (["--images", "LINE"], ["1x1000000", "at most 50 times"]),
    "bomb image": (["--images", "BOMB"], ["too large", "20 megapixels"]),
    "huge prompt": (["a" * 100_000], ["100000 characters", "at most 10000"]),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses_before_any_work(case: str, seed3_dir: Path, tmp_path: Path, images: dict[str, Path],
                                     no_work: None, capsys: pytest.CaptureFixture[str]) -> None:
    args, needles = CLI_CASES[case]
    args = [a.replace("IMAGE", str(images["wide"])).replace("LINE", str(images["line"]))
            .replace("BOMB", str(images["bomb"])) for a in args]
    prompt = [] if case in ("weights overflow", "absurd weight", "many prompts", "huge prompt") else ["a cat"]
    out = tmp_path / "out"
    line = refused(capsys, "sample", *prompt, *args, "--models", str(seed3_dir), "--output-dir", str(out))
    for needle in needles:
        assert needle in line, line
    assert not out.exists()


@pytest.mark.parametrize("where", ["proc", "file", "under a file", "read-only", "immutable"])
@pytest.mark.parametrize("flag", ["--output-dir", "--save-latents"])
def test_cli_refuses_unwritable_outputs_before_any_work(flag: str, where: str, seed3_dir: Path, tmp_path: Path,
                                                        no_work: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    with contextlib.ExitStack() as stack:
        directory = {"proc": lambda: Path("/proc/ccld-trt-out"), "file": lambda: a_file,
                     "under a file": lambda: a_file / "sub",
                     "read-only": lambda: stack.enter_context(read_only_tmpfs(tmp_path)) / "out",
                     "immutable": lambda: stack.enter_context(immutable_dir(tmp_path))}[where]()
        target = directory / "latents.npy" if flag == "--save-latents" else directory
        extra = [flag, str(target)] if flag == "--save-latents" else ["--output-dir", str(target)]
        out = tmp_path / "pngs"
        line = refused(capsys, "sample", "a cat", "--models", str(seed3_dir), "--output-dir", str(out), *extra)
        assert flag in line and str(target) in line, line
        assert not out.exists()  # the other output's probe left nothing behind


def test_output_dir_without_permission(tmp_path: Path) -> None:
    """As root, permissions do not deny: the check runs with the effective uid of nobody."""
    base = Path(tempfile.mkdtemp(prefix="ccld-trt-perm-", dir="/tmp"))
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        if os.geteuid() == 0:
            os.seteuid(65534)
        try:
            with pytest.raises(UserError, match="not writable: Permission denied") as raised:
                check_output_dir(locked, "--output-dir")
            with pytest.raises(UserError, match="cannot be created: Permission denied"):
                check_new_file(locked / "sub" / "latents.npy", "--save-latents")
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
        assert "\n" not in str(raised.value)
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o755)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_writable_check_leaves_nothing_behind(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "a" / "b" / "c", "--output-dir")
    check_new_file(tmp_path / "x" / "latents.npy", "--save-latents")
    assert not list(tmp_path.iterdir())
    (tmp_path / "kept").mkdir()
    check_output_dir(tmp_path / "kept", "--output-dir")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not list((tmp_path / "kept").iterdir())
    with pytest.raises(UserError, match=r"MiB free, the results need up to"):
        check_output_dir(tmp_path, "--output-dir", need_bytes=2**62)


def test_checkpoint_autoencoder_scale_is_checked_before_sampling(seed3_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    models = tmp_path / "models"
    models.mkdir()
    for path in seed3_dir.iterdir():
        (models / path.name).write_bytes(path.read_bytes())
    state = torch.load(models / "model_student.ckpt", weights_only=True)
    state["autoencoder_scale"] = torch.tensor(float("nan"))
    torch.save(state, models / "model_student.ckpt")

    def tripwire(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("sampling ran with a NaN autoencoder scale")
    monkeypatch.setattr("ccld_trt.pipeline.sample_latents", tripwire)
    status = run(["sample", "a cat", "--models", str(models), "--autoencoder-scale", "checkpoint", "--steps", "1",
                  "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1 and "the U-Net checkpoint's scale must be positive and at most 100, got nan" in err


# ------------------------------------------------------------------------------------- the one set of limits


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"n": 100_000}, "n", "must be from 1 to 16, got 100000"),
    ({"n": 10**400}, "n", "must be from 1 to 16, got a 1329-bit number"),
    ({"steps": 2_000_000, "method": "ddpm"}, "steps", "must be from 1 to 1000, got 2000000"),
    ({"prompts": [("a", 3e38), ("b", 3e38)]}, "prompts[0].weight", "must be from -100 to 100, got 3e+38"),
    ({"prompts": [("a", 1.0), ("b", -1e30)]}, "prompts[1].weight", "got -1e+30"),
    ({"prompts": [("a", math.nan)]}, "prompts[0].weight", "got nan"),
    ({"prompts": [("a" * 100_000, 3.0)]}, "prompts[0]", "is 100000 characters long"),
    ({"prompts": [("a", 1.0)] * 9}, "the number of prompts", "at most 8"),
    ({"latent_size": (12, 32)}, "latent_size", "multiples of 8 from 8 to 64"),
    ({"latent_size": (4096, 4096)}, "latent_size", "multiples of 8"),
    ({"latent_size": (64, 64), "n": 16, "prompts": [("a", 1.0)] * 4}, "batch_size", "at most 7 images per batch"),
])
def test_request_limits(fields: dict[str, Any], field: str, words: str) -> None:
    request = Request(**{"prompts": [("a cat", 3.0)], **fields})
    start = time.perf_counter()
    with pytest.raises(InvalidRequest) as raised:
        request.validate()
    assert time.perf_counter() - start < 1.0
    assert raised.value.field == field and words in raised.value.problem
    assert "\n" not in str(raised.value)


def test_limits_at_their_bounds_are_accepted() -> None:
    Request(prompts=[("a" * limits.MAX_PROMPT_CHARS, limits.MAX_WEIGHT)] * limits.MAX_PROMPTS,
            n=limits.MAX_IMAGES, steps=limits.MAX_STEPS).validate()
    Request(prompts=[("a", -limits.MAX_WEIGHT)], latent_size=(64, 64), n=4).validate()
    assert limits.autoencoder_scale_problem(limits.MAX_AUTOENCODER_SCALE) is None
    # the CFG sum's bound: |1 - sum(w)| + sum |w| at the limits, times fp16's largest value, is finite in fp32
    most = 1 + 2 * limits.MAX_PROMPTS * limits.MAX_WEIGHT
    assert np.isfinite(np.float32(most) * np.float32(65504) * np.float32(limits.MAX_STEPS))


# ------------------------------------------------------------------------------------------ image headers


def test_image_sizes_are_checked_from_the_header(images: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from ccld_trt.image_prompt import load_image_prompt

    decoded: list[tuple[int, int]] = []
    real_convert = Image.Image.convert

    def convert(self: Image.Image, *args: Any, **kwargs: Any) -> Image.Image:
        decoded.append(self.size)
        return real_convert(self, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "convert", convert)
    for name, words in (("line", "is 1x1000000; its long side may be at most 50 times"),
                        ("bomb", "is too large; the limit is 20 megapixels")):
        with pytest.raises(UserError, match=words):
            load_image_prompt(images[name], 224)
    assert not decoded  # refused before any pixel was decoded
    assert load_image_prompt(images["wide"], 224).shape == (1, 3, 224, 224)


# ------------------------------------------------------------------------------------------ the tokenizer


def _unbounded(text: str) -> list[int]:
    """What tokenize gave before its work was bounded: every token of the whole prompt, then truncation."""
    from ccld_trt.tokenizer import encode

    ids = [SOT_TOKEN, *encode(text), EOT_TOKEN]
    if len(ids) > CONTEXT_LENGTH:
        ids = [*ids[:CONTEXT_LENGTH - 1], EOT_TOKEN]
    return ids + [0] * (CONTEXT_LENGTH - len(ids))


def _prompts() -> Iterator[str]:
    rng = random.Random(21)
    words = ["a", "watercolor", "painting", "of", "lighthouse", "at", "dusk", "trending", "on", "artstation",
             "blackandwhitephotography", "😂😂", "<|endoftext|>", "&amp;", "Ã©", "\u0345", "!!!", "1234", "  \n\t",
             "don't", "<|startoftext|>x"]
    yield "a watercolor painting of a lighthouse at dusk"
    yield "x" + "\u0345" * 5000 + " y"  # fits in 77 tokens however long: U+0345 is skipped like a space
    for k in range(60):
        if k % 3 == 0:  # normal prompts, some beyond 77 tokens
            yield " ".join(rng.choice(words) for _ in range(rng.randrange(1, 400)))
        elif k % 3 == 1:  # one long word
            yield "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randrange(1, 12_000)))
        else:  # anything printable, long
            yield "".join(rng.choice(string.printable + "é😂") for _ in range(rng.randrange(1, 9_000)))


def test_bounded_tokenizer_gives_the_same_tokens() -> None:
    import warnings

    from ccld_trt.tokenizer import tokenize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for prompt in _prompts():
            assert tokenize(prompt)[0].tolist() == _unbounded(prompt), prompt[:80]


def test_tokenizer_work_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from ccld_trt import tokenizer

    seen: list[int] = []
    bpe = tokenizer._bpe()

    class Spy:
        def encode(self, text: str) -> list[int]:
            seen.append(len(text))
            return bpe.encode(text)
    monkeypatch.setattr(tokenizer, "_bpe", lambda: Spy())
    rng = random.Random(0)
    huge = "".join(rng.choice(string.ascii_lowercase) for _ in range(100_000))
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="truncated"):
        tokenizer.tokenize([huge, "painting " * 50_000])
    assert time.perf_counter() - start < 1.0  # was 3 s on an idle 2-core CPU for the first one alone
    assert max(seen) > 0 and sum(seen) <= 2 * tokenizer.USEFUL_CHARS


def test_longest_vocabulary_token() -> None:
    from ccld_trt.tokenizer import MAX_TOKEN_CHARS, _bpe

    bpe = _bpe()
    longest = 0
    for token in range(EOT_TOKEN - 1):
        with contextlib.suppress(Exception):
            longest = max(longest, len(bpe.decode([token]).rstrip(" ")))
    assert longest == MAX_TOKEN_CHARS


# ----------------------------------------------------------------------------------- writes that fail anyway


class _FillingDisk:
    """``open`` for write_atomic whose files take ``room`` bytes in all, then fail as a full disk does."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __call__(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        real = open(path, mode, *args, **kwargs)  # noqa: SIM115 (handed to the caller's with block)
        disk = self

        class File(io.RawIOBase):
            def __enter__(self) -> File:
                return self

            def __exit__(self, *exc: object) -> None:
                real.close()

            def write(self, data: Any) -> int:
                data = bytes(data)
                take = min(len(data), disk.room)
                real.write(data[:take])
                disk.room -= take
                if take < len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return take
        return File()


def _noise(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def _png_size(image: np.ndarray) -> int:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return len(buffer.getvalue())


def test_full_disk_keeps_what_was_written_and_leaves_no_partial_file(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = _noise(5)
    (tmp_path / "out_00000.png").write_bytes(b"an earlier run's image")
    room = _png_size(pixels[0]) + _png_size(pixels[1]) + 100  # two images fit, the third fails halfway
    monkeypatch.setattr("ccld_trt.export.atomic.open", _FillingDisk(room), raising=False)
    with pytest.raises(UserError) as raised:
        save_images(pixels, tmp_path)
    message = str(raised.value)
    assert "\n" not in message and "No space left on device" in message
    assert "out_00003.png" in message and "kept the 2 written before it (out_00001.png to out_00002.png)" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_00000.png", "out_00001.png", "out_00002.png"]
    assert (tmp_path / "out_00000.png").read_bytes() == b"an earlier run's image"
    for i in (1, 2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"out_{i:05}.png")), pixels[i - 1])

    monkeypatch.setattr("ccld_trt.export.atomic.open", _FillingDisk(1000), raising=False)
    latents = np.ones((4, 4, 32, 32), np.float32)
    with pytest.raises(UserError, match=r"writing latents file .* failed: No space left on device"):
        save_latents(latents, tmp_path / "latents.npy")
    assert not (tmp_path / "latents.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_00000.png", "out_00001.png", "out_00002.png"]


def test_a_real_full_disk(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        pixels = _noise(16)  # 12 KiB of noise each: the disk fills partway
        with pytest.raises(UserError, match="No space left on device; kept the") as raised:
            save_images(pixels, mount)
        assert "\n" not in str(raised.value)
        names = sorted(p.name for p in mount.iterdir())
        assert names and names == [f"out_{i:05}.png" for i in range(len(names))]  # no partial or temporary file
        for i, name in enumerate(names):
            assert np.array_equal(np.asarray(Image.open(mount / name)), pixels[i])
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_exclusive_atomic_write_never_replaces(tmp_path: Path) -> None:
    path = tmp_path / "taken"
    path.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        write_atomic(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["taken"]
    write_atomic(tmp_path / "new", b"data", exclusive=True)
    assert (tmp_path / "new").read_bytes() == b"data"


def test_atomic_text_is_utf8_under_the_c_locale(tmp_path: Path) -> None:
    """A library may leave the process in the C locale (OpenVINO's compile switches it): a report's dash must
    still be written, as UTF-8."""
    found = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        write_atomic(tmp_path / "report.md", "## Cold start \u2014 AMD EPYC")
    finally:
        locale.setlocale(locale.LC_CTYPE, found)
    assert (tmp_path / "report.md").read_bytes() == "## Cold start \u2014 AMD EPYC".encode()


# ------------------------------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def page_loader(seed3_dir: Path) -> Any:
    from ccld_trt.export.models import ModelFiles
    from ccld_trt.runner import BackendOptions, ModelSource, open_session
    from ccld_trt.serve import ModelLoader

    loader = ModelLoader(lambda: open_session(BackendOptions(), ModelSource(ModelFiles.resolve(seed3_dir))),
                         "torch on cpu")
    loader.start()
    deadline = time.monotonic() + 300
    while not loader.finished and time.monotonic() < deadline:
        time.sleep(0.1)
    loader.session()  # loaded, or the reason why not
    return loader


PAGE_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "huge prompt": ({"prompts": "a" * 100_000}, "100000 characters"),
    "weights overflow": ({"prompts": "a:3e38\nb:3e38"}, "weight must be from -100 to 100, got 3e+38"),
    "absurd weight": ({"prompts": "x:-1e30"}, "got -1e+30"),
    "many prompts": ({"prompts": "\n".join(f"p{i}" for i in range(5000))}, "at most 8"),
    "n": ({"n": 100_000}, "number of images must be from 1 to 16"),
    "steps": ({"steps": 2_000_000, "method": "ddpm"}, "steps must be from 1 to 1000"),
    "scale 0": ({"scale": 0}, "autoencoder scale must be positive and at most 100"),
    "scale nan": ({"scale": math.nan}, "autoencoder scale"),
    "image weight": ({"image": "wide", "image_weight": 1e30}, "weight"),
    "line image": ({"image": "line"}, "at most 50 times"),
    "bomb image": ({"image": "bomb"}, "20 megapixels"),
}


@pytest.mark.parametrize("case", PAGE_CASES)
def test_page_refuses_fast_and_serves_on(case: str, page_loader: Any, images: dict[str, Path],
                                         tmp_path: Path) -> None:
    from ccld_trt.serve import generate_for_page

    given, words = PAGE_CASES[case]
    values: dict[str, Any] = {"prompts": "a lighthouse", "image": None, "image_weight": 3.0, "steps": 1,
                              "method": "ddim", "seed": 0, "n": 1, "scale": 2.55, **given}
    if isinstance(values["image"], str):
        values["image"] = {"path": str(images[values["image"]])}
    start = time.perf_counter()
    with pytest.raises(UserError) as raised:
        generate_for_page(page_loader, tmp_path, values["prompts"], values["image"], values["image_weight"],
                          values["steps"], values["method"], values["seed"], values["n"], values["scale"])
    assert time.perf_counter() - start < FAST_S
    assert words in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
    if case == "bomb image":  # the last case: the page still makes images
        gallery, _, _ = generate_for_page(page_loader, tmp_path, "a lighthouse", None, 3.0, 1, "ddim", 0, 1, 2.55)
        assert len(gallery) == 1
