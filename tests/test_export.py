"""A synthetic set exported as an image folder: readable as torchvision's ImageFolder reads one,
loaded back exactly (float file) or from its PNGs, evaluated both ways; folders written by others.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tesla_func import cli
from tesla_func.data import load_dataset, pixels_from_info
from tesla_func.export import FOREIGN_LR, export_set, load_set_folder
from tesla_func.results import load_results
from tesla_func.sampling import per_class_indices
from tesla_func.synthetic import SyntheticSet, load_synthetic

# torchvision.datasets.folder.IMG_EXTENSIONS
_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_folder(root) -> tuple[list[str], list[tuple[np.ndarray, int]]]:
    """What ``torchvision.datasets.ImageFolder(root)`` holds: its ``classes`` and its (image,
    target) pairs, found and loaded as its ``find_classes``, ``make_dataset`` and default
    ``pil_loader`` do (torchvision cannot be installed beside torch 2.13 here): sorted class
    folders, label = sorted position, files walked in sorted order, images converted to RGB."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples = []
    for target in sorted(class_to_idx):
        for folder, _, names in sorted(os.walk(os.path.join(root, target), followlinks=True)):
            for name in sorted(names):
                if name.lower().endswith(_IMG_EXTENSIONS):
                    samples.append((os.path.join(folder, name), class_to_idx[target]))
    loaded = []
    for path, target in samples:
        with open(path, "rb") as f:
            loaded.append((np.asarray(Image.open(f).convert("RGB")), target))
    return classes, loaded


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _set(dataset, ipc=2, soft=True, noise=0.5, seed=0) -> SyntheticSet:
    """A set as distillation leaves one: real images moved off the 8-bit grid (some out of
    [0, 1]), soft labels, a learned lr."""
    gen = torch.Generator().manual_seed(seed)
    k = dataset.info.num_classes
    index = per_class_indices(dataset.train_labels, ipc, gen, k, dataset.info.class_names)
    images = dataset.train_images[index] + noise * torch.randn(
        dataset.train_images[index].shape, generator=gen)
    classes = torch.arange(k).repeat_interleave(ipc)
    labels = (torch.softmax(torch.randn(len(classes), k, generator=gen) + 4 *
                            torch.nn.functional.one_hot(classes, k), dim=1) if soft else classes)
    header = {"config": {"ipc": ipc, "method": "exact", "label_strategy": "sla"},
              "iteration": 3, "dataset_info": dataset.info.to_dict()}
    return SyntheticSet(images, labels, 0.0123, None, header)


def _accuracies(path):
    return load_results(path)["accuracy"].values.tolist()


def test_exported_folder_reads_as_image_folder_and_loads_back_both_ways(digits, tmp_path,
                                                                         capsys):
    synthetic = _set(digits)
    synthetic.save(tmp_path / "set.safetensors")
    out = tmp_path / "exported"
    assert cli.main(["export", str(tmp_path / "set.safetensors"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "8-bit PNGs: max abs pixel error" in printed and "PSNR" in printed

    # What ImageFolder sees: class k in the k-th folder, the set's images in order, 8 bits of
    # the de-normalised pixels.
    pixels, _ = pixels_from_info(synthetic.images, synthetic.header["dataset_info"])
    expected = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)  # (N, 1, 8, 8)
    classes, samples = image_folder(out)
    assert classes == [f"{k}_{k}" for k in range(10)] and len(samples) == 20
    for i, (image, target) in enumerate(samples):
        assert target == i // 2
        assert image.shape == (8, 8, 3) and (image == expected[i, 0].numpy()[:, :, None]).all()

    meta = json.loads((out / "set.json").read_text())
    assert meta["dataset"] == "digits" and meta["ipc"] == 2 and meta["lr"] == 0.0123
    assert meta["mean"] == list(digits.info.mean) and meta["std"] == list(digits.info.std)
    assert meta["zca"] is False and meta["labels"] == "soft" and meta["class_names"][3] == "3"
    error = (expected.double() / 255 - pixels.double()).abs()
    assert meta["png"]["max_abs_error"] == pytest.approx(float(error.max()))
    assert meta["png"]["mean_abs_error"] == pytest.approx(float(error.mean()))
    assert meta["png"]["psnr_db"] == pytest.approx(-10 * np.log10(float(error.square().mean())))
    assert 0 < meta["png"]["clipped_fraction"] < 1

    exact = load_synthetic(out)  # the float file: bitwise the set
    for name in ("images", "labels"):
        assert torch.equal(getattr(exact, name), getattr(synthetic, name))
    assert exact.lr == synthetic.lr
    from_pngs = load_synthetic(out, from_pngs=True)
    assert torch.equal(from_pngs.labels, synthetic.labels) and from_pngs.lr == synthetic.lr
    back, _ = pixels_from_info(from_pngs.images, digits.info.to_dict())
    assert torch.allclose(back, expected.float() / 255, atol=1e-6)
    assert "8-bit PNGs in" in from_pngs.header["images_from"]

    # Evaluated: the folder gives the accuracies of the file; its PNGs train too.
    common = ["--epochs", "3", "--num-models", "2", "--width", "8", "--no-progress"]
    runs = {"file": tmp_path / "set.safetensors", "folder": out}
    for name, source in runs.items():
        assert cli.main(["evaluate", "--synthetic", str(source), *common, "--out",
                         str(tmp_path / f"{name}.nc")]) == 0
    assert cli.main(["evaluate", "--synthetic", str(out), "--from-pngs", *common, "--out",
                     str(tmp_path / "pngs.nc")]) == 0
    assert _accuracies(tmp_path / "file.nc") == _accuracies(tmp_path / "folder.nc")
    assert len(_accuracies(tmp_path / "pngs.nc")) == 2
    assert load_results(tmp_path / "folder.nc").attrs["config"]["lr"] == synthetic.lr

    # Without the float file the PNGs are read, labelled by their folders, at set.json's lr.
    (out / "synthetic.safetensors").unlink()
    hard = load_set_folder(out)
    assert torch.equal(hard.labels, torch.arange(10).repeat_interleave(2))
    assert torch.equal(hard.images, from_pngs.images) and hard.lr == 0.0123


def test_whitened_sets_export_real_pixels(tmp_path):
    """ZCA is undone: real images of a whitened dataset export as their own 8-bit pixels, and
    come back whitened from the PNGs."""
    plain, whitened = load_dataset("digits"), load_dataset("digits", zca=True)
    index = per_class_indices(whitened.train_labels, 2, torch.Generator().manual_seed(0), 10,
                              whitened.info.class_names)
    synthetic = SyntheticSet(whitened.train_images[index], whitened.train_labels[index], 0.01,
                             None, {"dataset_info": whitened.info.to_dict()})
    loss = export_set(synthetic, tmp_path / "zca")
    real = plain.to_pixels(plain.train_images[index])  # the same images, never whitened
    _, samples = image_folder(tmp_path / "zca")
    png = torch.stack([torch.from_numpy(image[:, :, 0].copy()) for image, _ in samples])
    assert (png.int() - (real[:, 0] * 255).round().int()).abs().max() <= 1
    assert loss.max_abs_error < 1.5 / 255 and loss.clipped_fraction < 0.01
    assert json.loads((tmp_path / "zca" / "set.json").read_text())["zca"] is True
    back = load_synthetic(tmp_path / "zca", from_pngs=True)
    assert torch.allclose(whitened.to_pixels(back.images), png[:, None].float() / 255, atol=1e-4)
    # ZCA cannot be undone without its dataset
    info = {**whitened.info.to_dict(), "name": "cifar10", "num_classes": 10}
    lost = SyntheticSet(synthetic.images, synthetic.labels, 0.01, None, {"dataset_info": info})
    with pytest.raises(FileNotFoundError, match="ZCA.*give the folder that holds it"):
        export_set(lost, tmp_path / "nowhere", root=tmp_path / "empty")


def _write_pngs(root, pixels, classes, folder_names):
    for i, (image, c) in enumerate(zip(pixels, classes)):
        folder = root / folder_names[c]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{i:03d}.png")


def test_a_folder_written_by_someone_else_loads_with_its_dataset(digits, tmp_path, capsys):
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (20, 8, 8), generator=gen, dtype=torch.uint8).numpy()
    classes = np.repeat(np.arange(10), 2)
    names = [f"class-{c:02d}" for c in range(10)]
    root = tmp_path / "theirs"
    _write_pngs(root, pixels, classes, names)
    (root / "class-03" / "notes.txt").write_text("not an image")  # ignored

    with pytest.raises(ValueError, match="has no set.json .* --dataset NAME"):
        load_synthetic(root)
    theirs = load_synthetic(root, dataset="digits")
    assert torch.equal(theirs.labels, torch.from_numpy(classes))
    assert theirs.lr == FOREIGN_LR and theirs.header["lr_recorded"] is False
    assert theirs.header["ipc"] == 2 and theirs.header["dataset_info"]["name"] == "digits"
    mean, std = digits.info.mean[0], digits.info.std[0]
    assert torch.allclose(theirs.images[:, 0], (torch.from_numpy(pixels) / 255 - mean) / std)
    assert cli.main(["evaluate", "--synthetic", str(root), "--dataset", "digits", "--epochs", "1",
                     "--num-models", "1", "--width", "8", "--no-progress"]) == 0
    assert "test accuracy:" in capsys.readouterr().out
    assert cli.main(["evaluate", "--synthetic", str(root), "--epochs", "1", "--no-progress"]) == 1
    assert "has no set.json" in capsys.readouterr().err

    # Grey saved as RGB (as torchvision's loader gives it) is grey again; real colour is not.
    rgb = tmp_path / "rgb"
    _write_pngs(rgb, np.repeat(pixels[..., None], 3, axis=3), classes, names)
    assert torch.equal(load_synthetic(rgb, dataset="digits").images, theirs.images)
    (rgb / names[0] / "img000.png").unlink()
    coloured = np.repeat(pixels[0][..., None], 3, axis=2)
    coloured[0, 0] = (255, 0, 0)
    Image.fromarray(coloured).save(rgb / names[0] / "img000.png")
    with pytest.raises(ValueError, match="are colour, dataset 'digits' is grey"):
        load_synthetic(rgb, dataset="digits")

    bad = {
        "fewer": ("has 9 class folders", lambda d: _write_pngs(d, pixels[:18], classes[:18],
                                                               names)),
        "empty": ("class 'class-09' is empty", lambda d: (
            _write_pngs(d, pixels[:18], classes[:18], names), (d / names[9]).mkdir())),
        "size": ("are 16x16, dataset 'digits' has 8x8", lambda d: _write_pngs(
            d, np.zeros((20, 16, 16), np.uint8), classes, names)),
        "broken": ("is not a readable PNG/JPEG image", lambda d: (
            _write_pngs(d, pixels, classes, names),
            (d / names[4] / "img008.png").write_bytes(b"\x89PNG broken"))),
    }
    for case, (message, write) in bad.items():
        write(tmp_path / case)
        with pytest.raises(ValueError, match=message):
            load_synthetic(tmp_path / case, dataset="digits")
    with pytest.raises(ValueError, match="has no class folders"):
        load_synthetic(tmp_path / "fewer" / names[0], dataset="digits")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_synthetic(tmp_path / "absent")
    with pytest.raises(ValueError, match="from_pngs reads the PNGs of a folder"):
        synthetic = _set(digits)
        synthetic.save(tmp_path / "s.safetensors")
        load_synthetic(tmp_path / "s.safetensors", from_pngs=True)


def test_export_writes_only_into_an_empty_folder_or_an_earlier_export(digits, tmp_path):
    out = tmp_path / "out"
    export_set(_set(digits, soft=False), out)
    (out / "0_0" / "stray.png").write_bytes(b"")
    loss = export_set(_set(digits, ipc=3, seed=1), out)  # replaces the earlier export
    assert not (out / "0_0" / "stray.png").exists() and len(list((out / "0_0").iterdir())) == 3
    assert json.loads((out / "set.json").read_text())["png"]["max_abs_error"] == \
        loss.max_abs_error
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="is not a folder `tesla-func export` wrote"):
        export_set(_set(digits), mine)
    assert (mine / "thesis.tex").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    export_set(_set(digits), tmp_path / "empty")
    assert (tmp_path / "empty" / "set.json").is_file()


def test_class_folders_sort_in_class_order_and_are_safe_names():
    from tesla_func.data import FASHION_CLASSES
    from tesla_func.export import class_folders

    folders = class_folders(list(FASHION_CLASSES))
    assert folders[0] == "0_T-shirt_top" and sorted(folders) == folders
    many = class_folders([f"c{k}" for k in range(100)])
    assert many[7] == "07_c7" and sorted(many) == many
