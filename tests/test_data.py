"""Datasets: real Fashion-MNIST and digits; CIFAR / ImageNet64 files written in their formats."""

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
from tesla_func.data import DATASETS, ENV_VAR, FASHION_MNIST_DIR, available, load_dataset, locate


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
    ds = load_dataset("fashion-mnist")
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
        KeyError, match="known: fashion-mnist, digits, cifar10, cifar100, imagenet64"
    ):
        load_dataset("mnist3d")
    assert DATASETS == ("fashion-mnist", "digits", "cifar10", "cifar100", "imagenet64")


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
        statuses[n].found is None for n in ("fashion-mnist", "cifar10", "cifar100", "imagenet64")
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
    monkeypatch.setattr(data, "fit_zca", lambda x: fitted_on.append(x.shape) or _FakeZCA())
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
