"""Tests for ddpm.data.datasets: loaders (from tiny files written here), splits, ranges and grids.

Nothing here touches the network: torchvision's download functions are patched to fail.
"""
from __future__ import annotations

import logging
import pickle
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data.convert import model_to_uint8, save_image_grid, uint8_to_model, uint8_to_unit, unit_to_uint8
from ddpm.data.datasets import DATASETS, ImageData, load_dataset, split_holdout
from ddpm.data.folder import IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------
# Fixture helpers: tiny MNIST idx files and CIFAR-10 pickles in torchvision's layout
# --------------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the big-endian idx format (magic 0x08 = ubyte, then ndim)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.tobytes())


def make_mnist(root: Path, folder: str, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    """Write <root>/<folder>/raw/{train,t10k}-{images,labels}-idx?-ubyte with known content."""
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
        out[prefix] = (images, labels)
    return out


def make_cifar(root: Path, per_batch: int = 2) -> dict[str, np.ndarray]:
    """Write <root>/cifar-10-batches-py/{data_batch_1..5,test_batch} (row = R, G, B planes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    chw = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, size=per_batch).tolist())
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": []}, f)
        chw[name] = (data, labels)
    return chw


@pytest.fixture
def offline(monkeypatch):
    """Make every torchvision download fail as it would offline; count the attempts."""
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("offline (test)")

    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.mnist as tv_mnist
    import torchvision.datasets.utils as tv_utils

    for mod in (tv_utils, tv_mnist, tv_cifar):
        monkeypatch.setattr(mod, "download_and_extract_archive", fail)
    monkeypatch.setattr(tv_utils, "download_url", fail)
    monkeypatch.setattr(urllib.request, "urlopen", fail)
    return calls


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
def test_digits():
    data = load_dataset("digits")
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == np.uint8
    assert data.images.max() == 255 and data.images.min() == 0
    assert data.labels.dtype == np.int64 and set(data.labels.tolist()) == set(range(10))
    assert (data.channels, data.image_size, data.hw, data.name) == (1, 8, (8, 8), "digits")
    # round(v * 255 / 16) of the 0..16 values; ink is bright (the border is mostly dark).
    from sklearn.datasets import load_digits

    raw = load_digits().images
    np.testing.assert_array_equal(data.images[:, 0], np.round(raw * 255 / 16).astype(np.uint8))
    assert data.images[:, :, :, 0].mean() < 20


def test_digits_resize_and_channels():
    data = load_dataset("digits", image_size=16, channels=3)
    assert data.images.shape == (1797, 3, 16, 16)
    np.testing.assert_array_equal(data.images[:, 0], data.images[:, 2])  # grey replicated


def test_unknown_dataset_name():
    with pytest.raises(ValueError) as exc:
        load_dataset("imagenet")
    msg = str(exc.value)
    assert "'imagenet'" in msg and all(name in msg for name in DATASETS)


def test_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        load_dataset("digits", channels=2)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="test")


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_from_idx(tmp_path, offline, name, folder):
    written = make_mnist(tmp_path, folder)
    data = load_dataset(name, root=tmp_path)
    images, labels = written["train"]
    assert data.images.shape == (6, 1, 28, 28) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images[:, 0], images)
    np.testing.assert_array_equal(data.labels, labels.astype(np.int64))
    assert data.labels.dtype == np.int64 and data.name == name

    test = load_dataset(name, root=tmp_path, split="test")
    np.testing.assert_array_equal(test.images[:, 0], written["t10k"][0])
    assert offline == []  # files present: no download attempted


def test_mnist_resize_to_32(tmp_path, offline):
    make_mnist(tmp_path, "MNIST")
    # Overwrite with constant images: bilinear resizing keeps a constant image constant.
    const = np.stack([np.full((28, 28), v, np.uint8) for v in (0, 7, 200, 255, 3, 9)])
    write_idx(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte", const)
    data = load_dataset("mnist", root=tmp_path, image_size=32)
    assert data.images.shape == (6, 1, 32, 32) and data.image_size == 32
    np.testing.assert_array_equal(data.images[:, 0, 5, 7], [0, 7, 200, 255, 3, 9])
    assert (data.images == data.images[:, :, :1, :1]).all()
    rgb = load_dataset("mnist", root=tmp_path, image_size=32, channels=3)
    assert rgb.images.shape == (6, 3, 32, 32)


def test_cifar10_from_pickles(tmp_path, offline):
    batches = make_cifar(tmp_path)
    data = load_dataset("cifar10", root=tmp_path)
    assert data.images.shape == (10, 3, 32, 32) and data.images.dtype == np.uint8
    row, labels = batches["data_batch_1"]
    # A known pixel: channel c, row y, column x sits at c * 1024 + y * 32 + x of the flat row.
    c, y, x = 1, 5, 17
    assert data.images[0, c, y, x] == row[0, c * 1024 + y * 32 + x]
    np.testing.assert_array_equal(data.images[1], row[1].reshape(3, 32, 32))
    np.testing.assert_array_equal(data.labels[:2], labels)
    assert data.labels.dtype == np.int64
    # Batches are concatenated in order 1..5.
    np.testing.assert_array_equal(data.images[8], batches["data_batch_5"][0][0].reshape(3, 32, 32))
    test = load_dataset("cifar10", root=tmp_path, split="test", channels=1, image_size=16)
    assert test.images.shape == (2, 1, 16, 16)
    assert offline == []


def test_cifar10_rejects_foreign_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": Path("evil")}, f)
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", root=tmp_path, split="test", download=False)


@pytest.mark.parametrize("name, expected", [
    ("mnist", "MNIST/raw"),
    ("fashion_mnist", "FashionMNIST/raw"),
    ("cifar10", "cifar-10-batches-py"),
])
def test_missing_files_offline_clear_error(tmp_path, offline, name, expected):
    with pytest.raises(FileNotFoundError) as exc:
        load_dataset(name, root=tmp_path)
    msg = str(exc.value)
    assert name in msg and str(tmp_path / expected) in msg
    assert "network" in msg and "copy" in msg
    assert offline, "a download should have been attempted (and failed)"


def test_missing_files_no_download(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="download=False"):
        load_dataset("mnist", root=tmp_path, download=False)
    assert offline == []


def test_corrupt_idx_file(tmp_path, offline):
    make_mnist(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(ValueError, match="MNIST"):
        load_dataset("mnist", root=tmp_path)


# --------------------------------------------------------------------------------------------
# Folder datasets
# --------------------------------------------------------------------------------------------
def test_folder_flat_rgb(tmp_path):
    arrays = [np.full((6, 5, 3), (i, 10 * i, 100), np.uint8) for i in range(3)]
    for i, a in enumerate(arrays):
        write_png(tmp_path / f"img{i}.png", a)
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_dataset("folder", root=tmp_path)
    assert data.images.shape == (3, 3, 6, 5) and data.labels is None
    assert data.hw == (6, 5)
    np.testing.assert_array_equal(data.images[2, :, 0, 0], [2, 20, 100])
    with pytest.raises(ValueError, match="not square"):
        data.image_size


def test_folder_subfolder_labels(tmp_path):
    for cls, value in (("cat", 10), ("ant", 20), ("bee", 30)):
        for j in range(2):
            write_png(tmp_path / cls / f"{j}.png", np.full((4, 4), value + j, np.uint8))
    data = load_dataset("folder", root=tmp_path)
    assert data.images.shape == (6, 1, 4, 4)  # all grayscale -> 1 channel
    # Sorted class names: ant=0, bee=1, cat=2; sorted paths within.
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(data.images[:, 0, 0, 0], [20, 21, 30, 31, 10, 11])


def test_folder_mixed_top_level_and_subfolders(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "cls" / "b.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="a.png"):
        load_dataset("folder", root=tmp_path)


def test_folder_grayscale_vs_rgb(tmp_path):
    write_png(tmp_path / "g" / "a.png", np.full((4, 4), 50, np.uint8))
    write_png(tmp_path / "c" / "a.png", np.full((4, 4, 3), (10, 20, 30), np.uint8))
    gray = load_dataset("folder", root=tmp_path / "g")
    assert gray.channels == 1 and gray.images[0, 0, 0, 0] == 50
    rgb = load_dataset("folder", root=tmp_path / "c")
    assert rgb.channels == 3
    np.testing.assert_array_equal(rgb.images[0, :, 1, 1], [10, 20, 30])
    forced = load_dataset("folder", root=tmp_path / "g", channels=3)
    np.testing.assert_array_equal(forced.images[0, :, 0, 0], [50, 50, 50])


def test_folder_gray_gif_and_16bit_png(tmp_path):
    Image.fromarray(np.full((4, 4), 30, np.uint8)).convert("P").save(tmp_path / "a.gif")
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "b.png")
    data = load_dataset("folder", root=tmp_path)
    assert data.images.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(data.images[:, 0, 0, 0], [30, 255])


def test_folder_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("folder", root=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as exc:
        load_dataset("folder", root=tmp_path / "empty")
    msg = str(exc.value)
    assert str(tmp_path / "empty") in msg and all(ext in msg for ext in IMAGE_EXTENSIONS)


def test_folder_corrupt_png_names_file(tmp_path):
    write_png(tmp_path / "good.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError) as exc:
        load_dataset("folder", root=tmp_path)
    assert str(tmp_path / "bad.png") in str(exc.value)
    assert exc.value.__cause__ is not None


def test_folder_mixed_sizes(tmp_path):
    write_png(tmp_path / "a.png", np.full((4, 4), 100, np.uint8))
    write_png(tmp_path / "b.png", np.full((6, 8), 200, np.uint8))
    with pytest.raises(ValueError) as exc:
        load_dataset("folder", root=tmp_path)
    msg = str(exc.value)
    assert "4x4" in msg and "6x8" in msg and "image_size" in msg
    data = load_dataset("folder", root=tmp_path, image_size=8)
    assert data.images.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(data.images[:, 0, 3, 3], [100, 200])
    wide = load_dataset("folder", root=tmp_path, image_size=(4, 6))
    assert wide.hw == (4, 6)


def test_folder_mixed_modes_converted_and_logged(tmp_path, caplog):
    write_png(tmp_path / "a.png", np.full((4, 4), 90, np.uint8))  # L
    write_png(tmp_path / "b.png", np.full((4, 4, 3), (1, 2, 3), np.uint8))  # RGB
    write_png(tmp_path / "c.png", np.full((4, 4, 4), (4, 5, 6, 255), np.uint8))  # RGBA
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(tmp_path / "d.jpg", quality=100)
    with caplog.at_level(logging.INFO, logger="ddpm.data.folder"):
        data = load_dataset("folder", root=tmp_path)
    assert data.images.shape == (4, 3, 4, 4)
    np.testing.assert_array_equal(data.images[0, :, 0, 0], [90, 90, 90])
    np.testing.assert_array_equal(data.images[2, :, 0, 0], [4, 5, 6])
    records = [r for r in caplog.records if r.name == "ddpm.data.folder"]
    assert len(records) == 1
    assert "converted 2 of 4" in records[0].getMessage() and "RGBA: 1" in records[0].getMessage()
    gray = load_dataset("folder", root=tmp_path, channels=1)
    assert gray.images.shape == (4, 1, 4, 4) and gray.images[0, 0, 0, 0] == 90


def test_image_data_validation():
    with pytest.raises(ValueError):
        ImageData(images=np.zeros((2, 1, 4, 4), np.float32), labels=None, name="x")
    with pytest.raises(ValueError):
        ImageData(images=np.zeros((2, 1, 4, 4), np.uint8), labels=np.zeros(3), name="x")
    d = ImageData(images=np.zeros((3, 1, 4, 4), np.uint8), labels=[0, 1, 1], name="x")
    assert d.labels.dtype == np.int64 and len(d.subset([0, 2])) == 2 and d.num_classes == 2


# --------------------------------------------------------------------------------------------
# Holdout split
# --------------------------------------------------------------------------------------------
def test_split_holdout_deterministic_and_disjoint():
    state = np.random.get_state()
    a = split_holdout(100, 0.2, seed=3)
    b = split_holdout(100, 0.2, seed=3)
    c = split_holdout(100, 0.2, seed=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    train, hold = a
    assert len(hold) == 20 and len(train) == 80
    assert not set(train) & set(hold) and set(train) | set(hold) == set(range(100))
    assert train.dtype == np.int64 and hold.dtype == np.int64
    # The global RNG is untouched.
    assert all(np.array_equal(x, y) for x, y in zip(state[1:2], np.random.get_state()[1:2]))


def test_split_holdout_stratified():
    labels = np.repeat(np.arange(4), [50, 30, 10, 10])
    np.random.default_rng(0).shuffle(labels)
    train, hold = split_holdout(labels, 0.1, seed=0)
    assert np.bincount(labels[hold]).tolist() == [5, 3, 1, 1]
    assert len(train) + len(hold) == 100 and not set(train) & set(hold)
    t2, h2 = split_holdout(torch.as_tensor(labels), 0.1, seed=0)
    np.testing.assert_array_equal(hold, h2)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan"), True])
def test_split_holdout_bad_fraction(fraction):
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_holdout(10, fraction, seed=0)


# --------------------------------------------------------------------------------------------
# Ranges and grids
# --------------------------------------------------------------------------------------------
def test_range_round_trips():
    x = torch.arange(256, dtype=torch.uint8)
    m = uint8_to_model(x)
    assert m.dtype == torch.float32 and m.min() == -1 and m.max() == 1
    assert torch.equal(model_to_uint8(m), x)
    u = uint8_to_unit(x)
    assert u.min() == 0 and u.max() == 1
    assert torch.equal(unit_to_uint8(u), x)
    assert torch.equal(model_to_uint8(uint8_to_model(x, dtype=torch.float64)), x)
    # numpy in -> numpy out
    np.testing.assert_array_equal(model_to_uint8(uint8_to_model(x.numpy())), x.numpy())


def test_range_clamps_and_rejects():
    assert model_to_uint8(torch.tensor([-3.0, 5.0])).tolist() == [0, 255]
    assert unit_to_uint8(torch.tensor([-0.5, 2.0])).tolist() == [0, 255]
    with pytest.raises(TypeError):
        uint8_to_model(torch.zeros(2))
    with pytest.raises(TypeError):
        model_to_uint8(torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        model_to_uint8(torch.tensor([float("nan")]))


def test_save_image_grid(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(10, 1, 8, 8), dtype=np.uint8)
    out = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=4, scale=4, pad=1)
    assert out == tmp_path / "sub" / "grid.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "L"
        # 4 columns, 3 rows of 32x32 tiles with 1-pixel padding.
        assert im.size == (4 * 33 + 1, 3 * 33 + 1)
        arr = np.asarray(im)
    # Tile 5 (row 1, col 1), nearest-neighbour upscaled.
    tile = arr[1 + 33 : 1 + 33 + 32, 1 + 33 : 1 + 33 + 32]
    np.testing.assert_array_equal(tile, images[5, 0].repeat(4, 0).repeat(4, 1))
    assert not list(out.parent.glob(".*.ddpm-tmp"))  # atomic write left no temp file

    rgb = torch.randint(0, 256, (3, 3, 5, 5), dtype=torch.uint8)
    with Image.open(save_image_grid(rgb, tmp_path / "rgb.png")) as im:
        assert im.mode == "RGB" and im.size == (2 * 6 + 1, 2 * 6 + 1)
    with pytest.raises(ValueError, match="model_to_uint8"):
        save_image_grid(torch.zeros(2, 1, 4, 4), tmp_path / "bad.png")


# --- a folder from someone else: pipes, symlinks, decompression bombs, memory --------------------
def _folder_with_two(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(2):
        write_png(root / f"ok{i}.png", np.full((4, 4, 3), 50 * i, np.uint8))
    return root


def _load_in_thread(root: Path):
    """load_dataset in a thread: a regression that blocks on a pipe fails the test instead of hanging it."""
    import threading

    box: dict = {}
    t = threading.Thread(target=lambda: box.update(data=load_dataset("folder", root=root)), daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "load_dataset blocked (did it open the named pipe?)"
    return box["data"]


def test_folder_skips_a_named_pipe_without_opening_it(tmp_path, caplog):
    import os

    root = _folder_with_two(tmp_path)
    os.mkfifo(root / "p.png")
    with caplog.at_level(logging.WARNING, logger="ddpm.data.folder"):
        data = _load_in_thread(root)
    assert len(data) == 2
    assert "skipped 1 entries that are not regular files" in caplog.text and "p.png" in caplog.text


def test_folder_refuses_symlinks_that_leave_it(tmp_path, caplog):
    root = _folder_with_two(tmp_path)
    outside = tmp_path / "secret.png"
    write_png(outside, np.full((4, 4, 3), 7, np.uint8))
    (root / "leak.png").symlink_to(outside)
    (root / "inside.png").symlink_to(root / "ok0.png")  # a link inside the folder is fine
    (tmp_path / "elsewhere").mkdir()
    write_png(tmp_path / "elsewhere" / "x.png", np.zeros((4, 4, 3), np.uint8))
    (root / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="ddpm.data.folder"):
        data = load_dataset("folder", root=root)
    assert len(data) == 3 and not (data.images == 7).any()  # ok0, ok1, inside; not the secret
    assert "skipped 1 symlinks pointing outside the folder" in caplog.text and "leak.png" in caplog.text
    assert "symlinked folders (not followed)" in caplog.text


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (a decompression bomb's header; no pixel data)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_folder_caps_the_pixel_count_before_decoding(tmp_path, monkeypatch):
    import ddpm.data.folder as data_mod

    root = _folder_with_two(tmp_path)
    _png_header_only(root / "bomb.png", 9000, 9000)  # under PIL's own 89-megapixel limit
    with pytest.raises(ValueError, match=r"bomb\.png .*9000x9000 = 81000000 pixels; allowed: at most 67108864"):
        load_dataset("folder", root=root, image_size=4)
    (root / "bomb.png").unlink()
    monkeypatch.setattr(data_mod, "MAX_PIXELS", 15)  # the cap is checked on every file
    with pytest.raises(ValueError, match=r"ok0\.png .*4x4 = 16 pixels; allowed: at most 15"):
        load_dataset("folder", root=root)


MEMORY_PROBE = """
import resource, sys
import numpy as np
from PIL import Image
from ddpm.data.datasets import load_dataset
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = load_dataset("folder", root=sys.argv[1], image_size=8)
print(data.images.shape, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_folder_decodes_one_image_at_a_time(tmp_path, repo_root):
    """Peak memory grows by about one decoded image, not by all of them (the old loader: 4.8 images)."""
    import subprocess
    import sys

    n, side = 4, 3000
    for i in range(n):
        a = np.zeros((side, side, 3), np.uint8)
        a[:: 7 + i] = 200  # cheap to write, compresses to ~40 KB
        Image.fromarray(a).save(tmp_path / f"big{i}.png")
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], cwd=repo_root, capture_output=True,
                         text=True, check=True).stdout.split()
    grown_bytes = int(out[-1]) * 1024  # ru_maxrss is in KiB on Linux
    one_image = side * side * 4  # PIL keeps RGB as 4 bytes per pixel
    assert " ".join(out[:-1]) == f"({n}, 3, 8, 8)"
    assert grown_bytes < 2 * one_image, (grown_bytes, one_image)
