"""Datasets: real Fashion-MNIST and digits; CIFAR / ImageNet64 files written in their formats;
folders of PNG/JPEG images written with Pillow."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tesla_func import data
from tesla_func.data import (
    DATASETS,
    ENV_VAR,
    FASHION_MNIST_DIR,
    VALIDATION_SEED,
    available,
    locate,
    validation_indices,
)
from tesla_func.data import load_dataset as load_with_validation


def load_dataset(*args, **kwargs):
    """Most tests here check what the files hold, so they keep every training image; the
    validation split has tests of its own (``load_with_validation``)."""
    return load_with_validation(*args, **{"val_per_class": 0, **kwargs})


@pytest.fixture(autouse=True)
def _no_user_data(monkeypatch, tmp_path_factory):
    # Search only where each test says: no env var, an empty user data folder.
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg")))


# ----------------------------------------------------------------------------------------------
# Writers of the official formats
# ----------------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder: Path, n_train=20, n_test=10, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        (folder / f"{stem}.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    return arrays


def _cifar_pickle(obj) -> bytes:
    # The official files were written by Python 2's cPickle (protocol 2) with numpy 1.x, whose
    # arrays name numpy.core.multiarray._reconstruct; numpy 2 writes numpy._core. Spell it the old
    # way, as the real files do (protocol 2 stores globals as plain text lines).
    blob = pickle.dumps(obj, protocol=2)
    return blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def cifar_members(kind: str, n_per_batch=3, seed=0) -> dict[str, bytes]:
    """Member name -> pickled bytes, laid out like the official python-version CIFAR."""
    rng = np.random.default_rng(seed)
    k = 10 if kind == "cifar10" else 100

    def batch(n, offset):
        labels = [(offset + i) % k for i in range(n)]
        key = b"labels" if kind == "cifar10" else b"fine_labels"
        extra = {} if kind == "cifar10" else {b"coarse_labels": [lab // 5 for lab in labels]}
        return {
            b"batch_label": b"x",
            key: labels,
            **extra,
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"f%d.png" % i for i in range(n)],
        }

    if kind == "cifar10":
        members = {f"data_batch_{i}": batch(n_per_batch, i) for i in range(1, 6)}
        members["test_batch"] = batch(2, 0)
        members["batches.meta"] = {b"label_names": [b"c%d" % i for i in range(10)]}
    else:
        members = {"train": batch(5 * n_per_batch, 0), "test": batch(2, 0)}
        members["meta"] = {
            b"fine_label_names": [b"f%d" % i for i in range(100)],
            b"coarse_label_names": [b"g%d" % i for i in range(20)],
        }
    return {name: _cifar_pickle(obj) for name, obj in members.items()}


def write_cifar_folder(folder: Path, members: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in members.items():
        (folder / name).write_bytes(blob)


def write_cifar_archive(path: Path, inner: str, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{inner}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def write_imagenet64(folder: Path, batches=(1, 2, 10), n=2, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    train = folder / "Imagenet64_train_npz"
    train.mkdir(parents=True)
    written = {}
    for b in batches:
        x = rng.integers(0, 256, (n, 12288), dtype=np.uint8)
        labels = [b, 1000]  # 1-based, as the official files
        np.savez(train / f"train_data_batch_{b}.npz", data=x, labels=labels, mean=x.mean(0))
        written[f"train_{b}"] = x
    x = rng.integers(0, 256, (3, 12288), dtype=np.uint8)
    np.savez(folder / "val_data.npz", data=x, labels=[1, 2, 3])
    written["val"] = x
    return written


# ----------------------------------------------------------------------------------------------
# The real Fashion-MNIST
# ----------------------------------------------------------------------------------------------

HAS_FASHION = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


@pytest.mark.skipif(
    not HAS_FASHION,
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_from_the_debian_package():
    ds = load_dataset("fashion-mnist")  # every training image: the files' contents
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (
        10000,
        1,
        28,
        28,
    )
    assert ds.train_images.dtype == torch.float32 and ds.train_labels.dtype == torch.int64
    assert torch.equal(torch.bincount(ds.train_labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.test_labels), torch.full((10,), 1000))
    info = ds.info
    assert (info.num_classes, info.channels, info.image_size) == (10, 1, 28)
    assert info.mean == (0.2860,) and info.std == (0.3530,) and not info.zca
    assert info.source == str(FASHION_MNIST_DIR)
    # The fixed mean/std are the train set's own, to the 4 digits given.
    assert (
        abs(ds.train_images.mean().item()) < 1e-3 and abs(ds.train_images.std().item() - 1) < 1e-3
    )
    pixels = ds.to_pixels(ds.train_images[:100])
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
    assert torch.allclose(pixels * 255, (pixels * 255).round(), atol=1e-3)  # bytes / 255
    assert locate("fashion-mnist").found == FASHION_MNIST_DIR


# ----------------------------------------------------------------------------------------------
# digits, ZCA
# ----------------------------------------------------------------------------------------------


def test_digits_fixed_split_and_normalisation():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert ds.train_images.shape == (1438, 1, 8, 8) and ds.test_images.shape == (359, 1, 8, 8)
    raw = load_digits()
    # Sample i is a test sample iff i % 5 == 4.
    assert torch.allclose(
        ds.to_pixels(ds.test_images[:1])[0, 0],
        torch.tensor(raw.images[4] / 16, dtype=torch.float32),
        atol=1e-6,
    )
    assert ds.test_labels[:3].tolist() == raw.target[[4, 9, 14]].tolist()
    assert (
        abs(ds.train_images.mean().item()) < 1e-5 and abs(ds.train_images.std().item() - 1) < 1e-4
    )
    assert ds.info.convnet_config(width=8).image_size == 8


def test_zca_is_fitted_on_train_applied_to_test_and_invertible():
    plain = load_dataset("digits")
    ds = load_dataset("digits", zca=True)
    assert ds.info.zca and ds.info.zca_eps == 0.1 and ds.whitening is not None
    flat = plain.train_images.flatten(1)
    assert torch.allclose(ds.whitening.mean_vector, flat.mean(0, keepdim=True), atol=1e-6)
    assert torch.allclose(ds.test_images, ds.whitening(plain.test_images), atol=1e-6)

    # Whitening flattens the spectrum: the covariance eigenvalues spread far less than before.
    def spread(x):
        eig = torch.linalg.eigvalsh(torch.cov(x.flatten(1).T.double()))[-20:]
        return (eig.max() / eig.min()).item()

    assert spread(ds.train_images) < spread(plain.train_images) / 5
    pixels = plain.to_pixels(plain.test_images)
    assert torch.allclose(ds.to_pixels(ds.test_images), pixels, atol=1e-4)
    assert torch.allclose(ds.from_pixels(pixels), ds.test_images, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Finding files, and what is said when they are missing
# ----------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(
        KeyError, match="known: fashion-mnist, digits, cifar10, cifar100, imagenet64, folder"
    ):
        load_dataset("mnist3d")
    assert DATASETS == ("fashion-mnist", "digits", "cifar10", "cifar100", "imagenet64", "folder")


def test_missing_files_say_where_it_looked_and_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion-mnist", root=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and str(tmp_path / "fashion-mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message and ENV_VAR in message
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", root=tmp_path)
    statuses = {a.name: a for a in available(tmp_path)}
    assert statuses["digits"].found is not None
    assert all(
        statuses[n].found is None
        for n in ("fashion-mnist", "cifar10", "cifar100", "imagenet64", "folder")
    )


def test_env_var_folders_are_searched(tmp_path, monkeypatch):
    arrays = write_fashion(tmp_path / "store" / "fashion-mnist")
    monkeypatch.setenv(
        ENV_VAR, os.pathsep.join([str(tmp_path / "nothing"), str(tmp_path / "store")])
    )
    ds = load_dataset("fashion-mnist")
    assert ds.info.source == str(tmp_path / "store" / "fashion-mnist")
    assert ds.train_images.shape == (20, 1, 28, 28) and ds.test_images.shape == (10, 1, 28, 28)
    expected = torch.tensor(arrays["train-images-idx3-ubyte"][3] / 255, dtype=torch.float32)
    assert torch.allclose(ds.to_pixels(ds.train_images[3:4])[0, 0], expected, atol=1e-6)
    assert ds.train_labels.tolist() == (np.arange(20) % 10).tolist()


def test_one_missing_fashion_file_is_named(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_truncated_or_corrupt_idx_files_are_named(tmp_path):
    write_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # a download cut short
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_dataset("fashion-mnist", root=tmp_path)
    raw = gzip.decompress(blob)
    path.write_bytes(gzip.compress(raw[:-10]))  # valid gzip, short payload
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is truncated or corrupt"):
        load_dataset("fashion-mnist", root=tmp_path)
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]))  # float type: not ours
    with pytest.raises(ValueError, match="bad magic"):
        load_dataset("fashion-mnist", root=tmp_path)


# ----------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------


def _check_cifar(ds, members: dict[str, bytes], kind: str, first: str, n_train: int) -> None:
    k = 10 if kind == "cifar10" else 100
    assert ds.train_images.shape == (n_train, 3, 32, 32) and ds.test_images.shape == (2, 3, 32, 32)
    assert ds.info.num_classes == k and ds.info.channels == 3 and ds.info.image_size == 32
    assert not ds.info.zca  # switched off by the test: a 3072-wide ZCA fit takes ~30 s here
    batch = pickle.loads(members[first], encoding="bytes")
    rgb = batch[b"data"][1].reshape(3, 32, 32) / 255  # R plane, G plane, B plane
    assert torch.allclose(
        ds.to_pixels(ds.train_images[1:2])[0], torch.tensor(rgb).float(), atol=1e-5
    )
    label_key = b"labels" if kind == "cifar10" else b"fine_labels"
    assert ds.train_labels[:3].tolist() == batch[label_key][:3]
    assert ds.info.class_names[:2] == (("c0", "c1") if kind == "cifar10" else ("f0", "f1"))


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
@pytest.mark.parametrize("layout", ["folder", "archive"])
def test_cifar_from_the_official_layouts(tmp_path, kind, layout):
    members = cifar_members(kind)
    inner = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    if layout == "folder":
        write_cifar_folder(tmp_path / inner, members)
    else:
        archive = "cifar-10-python.tar.gz" if kind == "cifar10" else "cifar-100-python.tar.gz"
        write_cifar_archive(tmp_path / archive, inner, members)
    ds = load_dataset(kind, root=tmp_path, zca=False)
    first = "data_batch_1" if kind == "cifar10" else "train"
    _check_cifar(ds, members, kind, first, n_train=15)
    assert locate(kind, tmp_path).found.name == (inner if layout == "folder" else archive)


def test_cifar_default_is_zca(tmp_path, monkeypatch):
    # The fit itself is kornia's (tested on digits above); here only that CIFAR asks for it.
    fitted_on = []
    monkeypatch.setattr(data.load, "fit_zca", lambda x: fitted_on.append(x.shape) or _FakeZCA())
    write_cifar_folder(tmp_path / "cifar-10-batches-py", cifar_members("cifar10"))
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.info.zca and ds.info.zca_eps == 0.1 and isinstance(ds.whitening, _FakeZCA)
    assert fitted_on == [(15, 3, 32, 32)]  # the train images only
    assert torch.equal(ds.train_images, torch.zeros(15, 3, 32, 32))


class _FakeZCA:
    def __call__(self, x):
        return torch.zeros_like(x)


def test_corrupt_cifar_files_are_named_and_malicious_pickles_refused(tmp_path):
    members = cifar_members("cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_folder(folder, members)
    (folder / "data_batch_3").write_bytes(members["data_batch_3"][:500])
    with pytest.raises(ValueError, match="data_batch_3 is truncated"):
        load_dataset("cifar10", root=tmp_path, zca=False)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload()}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load (posix|os).system"):
        load_dataset("cifar10", root=tmp_path, zca=False)
    assert not marker.exists()

    archive = tmp_path / "a" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    write_cifar_archive(archive, "cifar-10-batches-py", members)
    archive.write_bytes(archive.read_bytes()[:3000])
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz is truncated"):
        load_dataset("cifar10", root=tmp_path / "a", zca=False)


# ----------------------------------------------------------------------------------------------
# Downsampled ImageNet 64x64
# ----------------------------------------------------------------------------------------------


def test_imagenet64_from_npz_batches(tmp_path):
    written = write_imagenet64(tmp_path)
    ds = load_dataset("imagenet64", root=tmp_path)
    assert ds.train_images.shape == (6, 3, 64, 64) and ds.test_images.shape == (3, 3, 64, 64)
    assert ds.info.num_classes == 1000 and ds.info.image_size == 64
    # Batches in numeric order (10 after 2), labels moved from 1..1000 to 0..999.
    assert ds.train_labels.tolist() == [0, 999, 1, 999, 9, 999]
    assert ds.test_labels.tolist() == [0, 1, 2]
    last = torch.tensor(written["train_10"][1].reshape(3, 64, 64) / 255).float()
    assert torch.allclose(ds.to_pixels(ds.train_images[5:6])[0], last, atol=1e-5)


def test_truncated_imagenet64_batch_is_named(tmp_path):
    write_imagenet64(tmp_path)
    path = tmp_path / "Imagenet64_train_npz" / "train_data_batch_2.npz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="train_data_batch_2.npz is truncated"):
        load_dataset("imagenet64", root=tmp_path)
    (tmp_path / "val_data.npz").unlink()
    with pytest.raises(FileNotFoundError, match="val_data.npz"):
        load_dataset("imagenet64", root=tmp_path)


# ----------------------------------------------------------------------------------------------
# Your own images: a folder of class folders of PNG/JPEG files
# ----------------------------------------------------------------------------------------------

FOLDER_CLASSES = ("cat", "ant", "bee")  # written in this order; the dataset sorts them


def write_image(path: Path, pixels: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(path)


def write_folder(
    root: Path, classes=FOLDER_CLASSES, n=6, size=(10, 10), channels=3, seed=0, names=None
) -> dict[str, np.ndarray]:
    """``root/<class>/<NN>.png`` of random pixels; returns 'class/file' -> (C, H, W) uint8."""
    rng = np.random.default_rng(seed)
    written = {}
    for c in classes:
        for name in names or [f"{i:02d}.png" for i in range(n)]:
            pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
            write_image(root / c / name, pixels[..., 0] if channels == 1 else pixels)
            written[f"{c}/{name}"] = pixels.transpose(2, 0, 1)
    return written


def _files_of(ds, images, written: dict[str, np.ndarray]) -> list[str]:
    """Which written file each (normalised) image is, by its exact bytes."""
    by_bytes = {a.tobytes(): key for key, a in written.items()}
    pixels = (ds.to_pixels(images) * 255).round().to(torch.uint8).numpy()
    return [by_bytes[p.tobytes()] for p in pixels]


def _documented_test_files(written: dict[str, np.ndarray], per_class: int) -> set[str]:
    """The split as the module docstring states it: per class, the smallest SHA-256 of
    '0:<class>/<file>'."""
    import hashlib

    def digest(key: str) -> bytes:
        return hashlib.sha256(f"0:{key}".encode()).digest()

    chosen = set()
    for c in {key.split("/")[0] for key in written}:
        keys = sorted((k for k in written if k.startswith(f"{c}/")), key=digest)
        chosen |= set(keys[:per_class])
    return chosen


def test_folder_shapes_classes_split_and_pixels(tmp_path):
    written = write_folder(tmp_path)
    ds = load_dataset("folder", root=tmp_path)
    info = ds.info
    assert info.name == "folder" and info.source == str(tmp_path.absolute())
    assert info.class_names == ("ant", "bee", "cat") and info.num_classes == 3
    assert (info.channels, info.image_size) == (3, 10) and not info.zca and info.zca_eps is None
    assert ds.whitening is None
    # 6 per class: max(1, 6 // 6) = 1 held out as test.
    assert ds.train_images.shape == (15, 3, 10, 10) and ds.test_images.shape == (3, 3, 10, 10)
    assert ds.train_images.dtype == torch.float32 and ds.train_labels.dtype == torch.int64
    assert ds.train_labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert ds.test_labels.tolist() == [0, 1, 2]
    train, test = _files_of(ds, ds.train_images, written), _files_of(ds, ds.test_images, written)
    assert sorted(train + test) == sorted(written)  # every image once, exact bytes
    assert train == sorted(train) and test == sorted(test)  # class order, then file name order
    assert [info.class_names[y] for y in ds.train_labels] == [f.split("/")[0] for f in train]
    assert set(test) == _documented_test_files(written, 1)
    # Pinned: a change here re-splits every folder dataset (experts trained before would have
    # seen today's test images).
    assert test == ["ant/02.png", "bee/05.png", "cat/00.png"]
    assert ds.info.convnet_config(width=4).channels == 3


def test_folder_split_depends_only_on_names(tmp_path):
    written = write_folder(tmp_path / "a", n=13)
    # The same files written in another order, to another place, plus a class of its own.
    for key in reversed(list(written)):
        write_image(tmp_path / "b" / key, written[key].transpose(1, 2, 0))
    write_folder(tmp_path / "b", classes=("dog",), seed=1)
    a, b = load_dataset("folder", tmp_path / "a"), load_dataset("folder", tmp_path / "b")
    again = load_dataset("folder", tmp_path / "a")
    assert torch.equal(a.train_images, again.train_images)
    assert torch.equal(a.test_images, again.test_images)
    assert b.info.class_names == ("ant", "bee", "cat", "dog")
    test_a = _files_of(a, a.test_images, written)
    assert len(test_a) == 6  # 13 // 6 = 2 per class
    assert set(test_a) == _documented_test_files(written, 2)
    assert set(_files_of(b, b.test_images[b.test_labels < 3], written)) == set(test_a)


def test_folder_train_test_pair_and_stats_of_train_only(tmp_path):
    written = write_folder(tmp_path / "train", n=4)
    white = np.full((10, 10, 3), 255, dtype=np.uint8)
    for c in FOLDER_CLASSES:
        for i in range(2):
            write_image(tmp_path / "test" / c / f"t{i}.png", white)
    (tmp_path / "val").mkdir()  # beside train/ and test/: not read
    ds = load_dataset("folder", root=tmp_path)
    assert ds.train_images.shape == (12, 3, 10, 10) and ds.test_images.shape == (6, 3, 10, 10)
    assert ds.info.class_names == ("ant", "bee", "cat")
    assert ds.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert _files_of(ds, ds.train_images, written) == sorted(written)  # all of train/ is train
    # mean/std: the train images' own (the white test images would pull the mean up).
    train = np.stack(list(written.values())).astype(np.float64) / 255  # (12, 3, 10, 10)
    np.testing.assert_allclose(ds.info.mean, train.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(ds.info.std, train.std(axis=(0, 2, 3), ddof=1), rtol=1e-5)
    assert ds.train_images.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (ds.train_images.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-5
    assert torch.allclose(ds.to_pixels(ds.test_images), torch.ones(6, 3, 10, 10), atol=1e-5)


@pytest.mark.parametrize("size", [4, 10, 16])
def test_folder_resizes_to_image_size_with_pillow_bilinear(tmp_path, size):
    from PIL import Image

    written = write_folder(tmp_path, size=(10, 10))
    written |= write_folder(tmp_path, classes=("ant",), size=(12, 7), seed=1, names=["wide.png"])
    with pytest.raises(ValueError, match=r"ant/00.png is 10x10 but .*ant/wide.png is 12x7"):
        load_dataset("folder", root=tmp_path)  # sizes differ, and no image_size
    ds = load_dataset("folder", root=tmp_path, image_size=size)
    assert ds.info.image_size == size and ds.train_images.shape[1:] == (3, size, size)

    def resized(key: str, resample=Image.Resampling.BILINEAR) -> np.ndarray:
        image = Image.open(tmp_path / key).resize((size, size), resample)  # wide: stretched
        return np.asarray(image).transpose(2, 0, 1)

    expected = {key: resized(key) for key in written}
    found = _files_of(ds, torch.cat([ds.train_images, ds.test_images]), expected)
    assert sorted(found) == sorted(written)  # each image is Pillow's bilinear resize of a file
    if size < 10:  # bilinear antialiases when shrinking: not a subsample of the pixels
        nearest = resized("ant/00.png", Image.Resampling.NEAREST)
        assert not np.array_equal(expected["ant/00.png"], nearest)


def test_folder_non_square_needs_image_size(tmp_path):
    write_folder(tmp_path, size=(12, 8))
    with pytest.raises(ValueError, match=r"ant/00.png is 12x8, not square: pass image_size"):
        load_dataset("folder", root=tmp_path)
    assert load_dataset("folder", root=tmp_path, image_size=8).train_images.shape == (15, 3, 8, 8)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        load_dataset("folder", root=tmp_path, image_size=0)
    with pytest.raises(ValueError, match="image_size= is not an option of dataset 'digits'"):
        load_dataset("digits", image_size=8)


def test_folder_channels_grey_colour_alpha_palette_and_jpeg(tmp_path):
    grey = write_folder(tmp_path / "grey", channels=1)
    ds = load_dataset("folder", root=tmp_path / "grey")
    assert ds.info.channels == 1 and ds.train_images.shape == (15, 1, 10, 10)
    assert sorted(_files_of(ds, torch.cat([ds.train_images, ds.test_images]), grey)) == sorted(
        grey
    )
    # grey with alpha is grey; RGBA and palette images are colour; alpha is dropped.
    rng = np.random.default_rng(5)
    write_image(tmp_path / "grey" / "ant" / "la.png", rng.integers(0, 256, (10, 10, 2), np.uint8))
    assert load_dataset("folder", tmp_path / "grey").info.channels == 1
    colour = write_folder(tmp_path / "colour")
    rgba = rng.integers(0, 256, (10, 10, 4), dtype=np.uint8)
    write_image(tmp_path / "colour" / "bee" / "rgba.png", rgba)
    write_image(tmp_path / "colour" / "cat" / "palette.png", rgba[..., :3], mode="P")
    ds = load_dataset("folder", root=tmp_path / "colour")
    assert ds.info.channels == 3 and len(ds.train_images) + len(ds.test_images) == 20
    colour["bee/rgba.png"] = rgba[..., :3].transpose(2, 0, 1)
    found = _files_of(ds, ds.train_images[ds.train_labels == 1], colour)
    assert "bee/rgba.png" in found
    # A JPEG (upper-case extension too) is read; its pixels are Pillow's decoding of it.
    from PIL import Image

    write_image(tmp_path / "colour" / "ant" / "photo.JPG", rgba[..., :3])
    ds = load_dataset("folder", root=tmp_path / "colour")
    photo = np.asarray(Image.open(tmp_path / "colour" / "ant" / "photo.JPG")).transpose(2, 0, 1)
    ant = torch.cat([ds.train_images[ds.train_labels == 0], ds.test_images[ds.test_labels == 0]])
    assert "ant/photo.JPG" in _files_of(ds, ant, colour | {"ant/photo.JPG": photo})


def test_folder_skips_hidden_and_other_files(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "README.txt").write_text("not a class")
    (tmp_path / ".cache").mkdir()  # hidden folder: not a class
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    (tmp_path / "ant" / "._00.png").write_bytes(b"macOS resource fork, not an image")
    (tmp_path / "ant" / "deeper").mkdir()
    write_image(tmp_path / "ant" / "deeper" / "x.png", np.zeros((10, 10, 3), np.uint8))
    ds = load_dataset("folder", root=tmp_path)
    assert ds.info.class_names == ("ant", "bee", "cat") and len(ds.train_images) == 15


def test_folder_bad_layouts_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"read only from root=DIR \(--root DIR\)"):
        load_dataset("folder")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"root {missing} does not exist"):
        load_dataset("folder", root=missing)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ValueError, match="file.png is a file, not a folder"):
        load_dataset("folder", root=tmp_path / "file.png")
    flat = tmp_path / "flat"  # images but no class folders
    write_image(flat / "a.png", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match=f"{flat} has no class folders"):
        load_dataset("folder", root=flat)
    (tmp_path / "bare").mkdir()
    with pytest.raises(ValueError, match="bare has no class folders"):
        load_dataset("folder", root=tmp_path / "bare")

    root = tmp_path / "data"
    write_folder(root)
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class 'dog' is empty: .*dog holds no"):
        load_dataset("folder", root=root)
    write_folder(root, classes=("dog",), n=1, seed=2)
    with pytest.raises(ValueError, match=r"class 'dog' has 1 image .*dog/00.png.*at least 2"):
        load_dataset("folder", root=root)

    every_class_empty = tmp_path / "empties"
    for c in FOLDER_CLASSES:
        (every_class_empty / c).mkdir(parents=True)
    with pytest.raises(ValueError, match="class 'ant' is empty"):
        load_dataset("folder", root=every_class_empty)


def test_folder_train_test_pair_errors_name_the_class(tmp_path):
    write_folder(tmp_path / "train", n=2)
    with pytest.raises(ValueError, match="has train/ but no test/"):
        load_dataset("folder", root=tmp_path)
    write_folder(tmp_path / "test", classes=("ant", "cat"), n=1)
    with pytest.raises(ValueError, match=r"class 'bee' is missing from .*test"):
        load_dataset("folder", root=tmp_path)
    write_folder(tmp_path / "test", classes=("bee", "dog"), n=1)
    with pytest.raises(ValueError, match=r"class 'dog' is in .*test but missing from .*train"):
        load_dataset("folder", root=tmp_path)
    for f in (tmp_path / "test" / "dog").iterdir():
        f.unlink()
    (tmp_path / "test" / "dog").rmdir()
    (tmp_path / "test" / "cat" / "00.png").unlink()
    with pytest.raises(ValueError, match=r"class 'cat' is empty: .*test/cat holds no"):
        load_dataset("folder", root=tmp_path)
    write_folder(tmp_path / "test", classes=("cat",), n=1)
    ds = load_dataset("folder", root=tmp_path)
    assert len(ds.train_images) == 6 and len(ds.test_images) == 3  # a 1-image class is fine here


def test_folder_bad_images_are_named(tmp_path):
    write_folder(tmp_path)
    path = tmp_path / "bee" / "03.png"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # cut short
    with pytest.raises(ValueError, match=r"bee/03.png is not a readable PNG/JPEG image"):
        load_dataset("folder", root=tmp_path)
    path.write_text("not an image at all")
    with pytest.raises(ValueError, match=r"bee/03.png is not a readable PNG/JPEG image"):
        load_dataset("folder", root=tmp_path)
    from PIL import Image

    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(path, format="GIF")  # not PNG/JPEG
    with pytest.raises(ValueError, match=r"bee/03.png is not a readable PNG/JPEG image"):
        load_dataset("folder", root=tmp_path)
    path.write_bytes(blob)

    # One grey image among colour ones: both kinds named.
    write_image(tmp_path / "cat" / "grey.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(
        ValueError, match=r"mixed channel counts: .*cat/grey.png is grey \(mode L\) but "
        r".*ant/00.png is colour \(mode RGB\)"
    ):
        load_dataset("folder", root=tmp_path)
    (tmp_path / "cat" / "grey.png").unlink()

    # 16-bit grey: refused, not clipped.
    Image.fromarray(np.full((10, 10), 40000, np.uint16)).save(tmp_path / "cat" / "deep.png")
    with pytest.raises(ValueError, match=r"cat/deep.png has Pillow mode 'I;16"):
        load_dataset("folder", root=tmp_path)
    (tmp_path / "cat" / "deep.png").unlink()
    assert load_dataset("folder", root=tmp_path).info.num_classes == 3


def test_folder_of_one_colour_cannot_be_normalised(tmp_path):
    for c in FOLDER_CLASSES:
        for i in range(2):
            write_image(tmp_path / c / f"{i}.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match=r"std per channel is \(0.0,\)"):
        load_dataset("folder", root=tmp_path)


def test_folder_zca(tmp_path):
    write_folder(tmp_path, n=12)
    plain = load_dataset("folder", root=tmp_path)
    ds = load_dataset("folder", root=tmp_path, zca=True)
    assert ds.info.zca and ds.info.zca_eps == 0.1 and ds.whitening is not None
    assert ds.info.mean == plain.info.mean and ds.info.std == plain.info.std
    assert torch.allclose(ds.test_images, ds.whitening(plain.test_images), atol=1e-5)
    pixels = plain.to_pixels(plain.test_images)
    assert torch.allclose(ds.to_pixels(ds.test_images), pixels, atol=1e-4)


def test_folder_is_found_only_under_root(tmp_path, monkeypatch):
    write_folder(tmp_path / "mine")
    write_fashion(tmp_path / "fmnist")
    assert "folder" in DATASETS
    assert data.search_dirs("folder") == [] and locate("folder").found is None
    assert data.search_dirs("folder", tmp_path / "mine") == [tmp_path / "mine"]
    found = {a.name: a.found for a in available(tmp_path / "mine")}
    assert found["folder"] == (tmp_path / "mine").absolute() and found["fashion-mnist"] is None
    found = {a.name: a.found for a in available(tmp_path / "fmnist")}
    assert found["folder"] is None and found["fashion-mnist"] == tmp_path / "fmnist"
    # TESLA_FUNC_DATA and the user folder are not searched for it.
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "mine"))
    with pytest.raises(FileNotFoundError, match="read only from root=DIR"):
        load_dataset("folder")


def test_folder_end_to_end_experts_distill_evaluate(tmp_path):
    from tesla_func.distill import DistillConfig, Distiller
    from tesla_func.experts import ExpertConfig, load_experts, train_experts

    root = tmp_path / "images"
    write_folder(root)
    ds = load_dataset("folder", root=root)
    train_experts(
        ExpertConfig(dataset="folder", num_experts=1, epochs=2, width=4, batch_size=8, seed=0),
        tmp_path / "experts",
        dataset=ds,
        progress=False,
    )
    (expert,) = load_experts(tmp_path / "experts")
    assert expert.dataset == "folder" and expert.header["dataset_info"]["source"] == str(root)
    assert expert.config.channels == 3 and expert.config.num_classes == 3
    cfg = DistillConfig(
        experts_dir=str(tmp_path / "experts"),
        dataset="folder",
        data_root=str(root),
        ipc=2,
        iterations=2,
        syn_steps=2,
        match_epochs=1,
        max_start_epoch=1,
        eval_epochs=2,
        eval_models=1,
        save_every=2,
    )
    distiller = Distiller(cfg, tmp_path / "run", progress=False, dataset=ds, experts=[expert])
    synthetic = distiller.run()
    assert synthetic.images.shape == (6, 3, 10, 10) and torch.isfinite(synthetic.images).all()
    result = distiller.evaluate(synthetic)
    assert len(result.accuracies) == 1 and 0 <= result.accuracies[0] <= 1
    # Without dataset=, the distiller loads the folder itself from data_root, with the experts'
    # validation split: the same dataset.
    again = Distiller(cfg, tmp_path / "run2", progress=False)
    assert again.dataset.info == ds.info
    assert torch.equal(again.dataset.train_images, ds.train_images)


def test_folder_applies_exif_orientation(tmp_path):
    from PIL import Image

    written = write_folder(tmp_path)
    turned = Image.fromarray(written["ant/00.png"].transpose(1, 2, 0))
    exif = Image.Exif()
    exif[0x0112] = 3  # Orientation: shown rotated by 180 degrees
    turned.save(tmp_path / "ant" / "00.png", exif=exif)
    ds = load_dataset("folder", root=tmp_path)
    shown = np.ascontiguousarray(written["ant/00.png"][:, ::-1, ::-1])
    assert _files_of(ds, ds.train_images[:1], {"ant/00.png": shown}) == ["ant/00.png"]


# ----------------------------------------------------------------------------------------------
# The validation split
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_FASHION, reason="Fashion-MNIST not installed")
def test_fashion_mnist_holds_out_5000_balanced_validation_images():
    everything = load_dataset("fashion-mnist")
    ds = load_with_validation("fashion-mnist")
    assert ds.info.val_per_class == 500 and ds.val_images.shape == (5000, 1, 28, 28)
    assert torch.equal(torch.bincount(ds.val_labels), torch.full((10,), 500))
    assert torch.equal(torch.bincount(ds.train_labels), torch.full((10,), 5500))
    # the two parts are the training files, disjoint and complete
    index = validation_indices(everything.train_labels, 500, 10)
    assert torch.equal(ds.val_images, everything.train_images[index])
    keep = torch.ones(60000, dtype=torch.bool)
    keep[index] = False
    assert torch.equal(ds.train_images, everything.train_images[keep])
    assert torch.equal(ds.test_images, everything.test_images)


def test_the_split_is_fixed_whatever_the_run():
    a, b = load_with_validation("digits"), load_with_validation("digits")
    assert torch.equal(a.val_images, b.val_images) and a.val_images.shape == (200, 1, 8, 8)
    assert torch.equal(torch.bincount(a.val_labels), torch.full((10,), 20))
    labels = a.train_labels.repeat(2)
    first = validation_indices(labels, 3, 10)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(first, validation_indices(labels, 3, 10))
    assert VALIDATION_SEED == 0
    # the mean/std of digits are the (remaining) train part's own
    assert abs(a.train_images.mean().item()) < 1e-5


def test_a_class_too_small_to_split_is_named(tmp_path):
    write_folder(tmp_path)  # 6 images per class: 1 test, 5 train
    assert load_with_validation("folder", root=tmp_path).info.val_per_class == 1
    with pytest.raises(ValueError, match=r"class 'ant' has 5 training images, too few to hold "
                                         r"out 5 for validation"):
        load_with_validation("folder", root=tmp_path, val_per_class=5)
    with pytest.raises(ValueError, match="val_per_class must be an int >= 0"):
        load_with_validation("digits", val_per_class=-1)
