"""A synthetic set as an image folder, for the tools that read one, and back.

``tesla-func export SET --out DIR`` (:func:`export_set`) writes::

    DIR/0_T-shirt_top/0.png ... DIR/9_Ankle boot/9.png   one folder per class, 8-bit PNGs
    DIR/synthetic.safetensors                            the exact set (load_synthetic's file)
    DIR/set.json                                         what a loader needs (below)

- **PNGs.** Each image as pixels: the normalisation undone with the set's ``dataset_info`` and
  ZCA undone where it was applied (:func:`tesla_func.data.pixels_from_info`, which refits the
  whitening from the dataset: ``root=`` / ``--root`` says where it is), clipped to [0, 1] and
  rounded to 8 bits; grey for one channel, RGB for three. A class folder is named ``<k>_<class
  name>`` with k zero-padded, so the sorted folder names are in class order and
  ``torchvision.datasets.ImageFolder(DIR)`` gives image ``DIR/<k>_.../<i>.png`` the label k
  (it skips the files beside the folders). Image i is the i-th image of its class in the set.
- **The float file** holds the exact images, labels (soft or learned ones included), learned lr
  and header, bit for bit: what :func:`load_set_folder` reads by default.
- **set.json**: ``dataset`` (its name), ``class_names``, ``class_folders``, ``num_classes``,
  ``ipc``, ``channels``, ``image_size``, ``mean`` and ``std`` per channel, ``zca`` and
  ``zca_eps``, ``lr`` (the learned student lr to train with), ``labels`` ("hard" or "soft": what
  the float file holds; the folders give hard labels), ``float_file``, ``pixels`` (how a pixel
  becomes a network input), ``png`` (what the 8 bits lost, below) and ``dataset_info`` (the
  whole record, to reload the dataset).

What the PNGs lose (:class:`PngLoss`, printed by the command and written in set.json): on the
pixel scale (0 = black, 1 = white) the largest and the mean absolute difference between the PNG
pixels and the exact ones, the PSNR, and the share of values that clipping to [0, 1] changed
(more than half an 8-bit level outside it); rounding alone is at most 1/510 = 0.002.

Reading back, :func:`load_set_folder` (and :func:`tesla_func.synthetic.load_synthetic`, and
``tesla-func evaluate --synthetic DIR``): the float file when it is there, bitwise the exported
set; with ``from_pngs`` (``--from-pngs``), or without the float file, the PNGs, normalised as the
dataset's images (ZCA refitted where set.json says so) and labelled by their class folder (soft
labels and lr from the float file when it is there). A folder someone else wrote in the
``ImageFolder`` layout (PNG or JPEG files in class folders, no set.json) loads with the
``dataset`` it belongs to: its mean, std and ZCA normalise the images, whose size and channels
must be the dataset's; there are as many class folders as classes, class k being the k-th in
sorted order; lr 0.01 unless one is given at evaluation. Nothing here is a pickle: PNG, JSON and
safetensors only.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tesla_func.data import (
    Dataset,
    inputs_from_info,
    load_dataset,
    pixels_from_info,
    read_class_folders,
)
from tesla_func.fileio import atomic_write_text
from tesla_func.synthetic import SyntheticSet, class_layout, load_synthetic

FORMAT = "tesla_func.set_folder"
FORMAT_VERSION = 1
META = "set.json"
FLOAT_FILE = "synthetic.safetensors"
FOREIGN_LR = 0.01  # the lr of a folder that records none (evaluate's default for real images)
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')  # not in a folder name, on any system


@dataclass(frozen=True)
class PngLoss:
    """What rounding to 8-bit PNGs lost, on the pixel scale (0 = black, 1 = white)."""

    max_abs_error: float  # largest |PNG pixel - exact pixel|
    mean_abs_error: float
    psnr_db: float | None  # 10 log10(1 / mean squared error); None when the PNGs are exact
    # share of the exact values more than half a level outside [0, 1]: clipping changed them
    clipped_fraction: float

    def __str__(self) -> str:
        psnr = "exact" if self.psnr_db is None else f"PSNR {self.psnr_db:.1f} dB"
        return (f"8-bit PNGs: max abs pixel error {self.max_abs_error:.4f}, mean "
                f"{self.mean_abs_error:.4f} (1 = black to white), {psnr}, "
                f"{100 * self.clipped_fraction:.2f} % of values clipped to [0, 1]")


def png_loss(pixels: torch.Tensor, png: torch.Tensor) -> PngLoss:
    """The loss from exact ``pixels`` (about [0, 1]) to their 8-bit ``png`` values, same shape."""
    exact = pixels.detach().cpu().double()
    error = (png.cpu().double() / 255 - exact).abs()
    mse = float(error.square().mean())
    return PngLoss(
        max_abs_error=float(error.max()),
        mean_abs_error=float(error.mean()),
        psnr_db=None if mse == 0 else 10 * math.log10(1 / mse),
        # (values within half a level of [0, 1], float noise of real pixels among them, round
        # to 0 or 255 anyway)
        clipped_fraction=float(((exact < -0.5 / 255) | (exact > 1 + 0.5 / 255)).double().mean()),
    )


def class_folders(names: list[str]) -> list[str]:
    """``<k>_<name>`` for each class k, k zero-padded to one width so that the folders sort in
    class order; characters no file system takes in a name become ``_``."""
    width = len(str(len(names) - 1))
    return [f"{k:0{width}d}_{_UNSAFE.sub('_', name)[:100]}" for k, name in enumerate(names)]


def _check_target(out: Path) -> None:
    """``out`` may be written: absent, an empty folder, or a folder an export wrote."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} is a file: --out must be a folder (it is created)")
    if any(out.iterdir()) and _read_meta(out) is None:
        raise ValueError(f"{out} holds files and is not a folder `tesla-func export` wrote (no "
                         f"{META}): choose another --out")


def export_set(
    synthetic: SyntheticSet | str | Path,
    out_dir: str | Path,
    *,
    dataset: Dataset | None = None,
    root: str | Path | None = None,
) -> PngLoss:
    """Write ``synthetic`` (a set, or its file) as the image folder ``out_dir``; see the module
    docstring. Returns (and writes in set.json) what the 8-bit PNGs lost.

    The pixels are undone with ``dataset`` if given, else from the set's ``dataset_info``
    (a ZCA-whitened set reloads its dataset, from ``root`` if given). The folder is written
    beside ``out_dir`` and then renamed to it, replacing an earlier export there; a folder that
    holds anything else is refused. Raises FileNotFoundError when a whitened set's dataset is
    not found, ValueError for a set without ``dataset_info`` or a bad ``out_dir``.
    """
    where = str(synthetic) if not isinstance(synthetic, SyntheticSet) else "the synthetic set"
    synthetic = synthetic if isinstance(synthetic, SyntheticSet) else load_synthetic(synthetic)
    out = Path(out_dir)
    _check_target(out)
    k, ipc, names = class_layout(synthetic, where)
    info = synthetic.header["dataset_info"]
    pixels, note = pixels_from_info(synthetic.images.float(), info, dataset=dataset, root=root)
    if note:
        raise FileNotFoundError(f"cannot write {where} as pixels: {note}; give the folder that "
                                "holds it (root=, --root)")
    png = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).cpu()  # (N, C, H, W)
    loss = png_loss(pixels, png)
    folders = class_folders(names)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        width = len(str(ipc - 1))
        for c, folder in enumerate(folders):
            (tmp / folder).mkdir()
            for i in range(ipc):
                array = png[c * ipc + i].permute(1, 2, 0).numpy()  # (H, W, C)
                Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(
                    tmp / folder / f"{i:0{width}d}.png", format="PNG")
        synthetic.save(tmp / FLOAT_FILE)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dataset": info.get("name"),
            "class_names": names,
            "class_folders": folders,
            "num_classes": k,
            "ipc": ipc,
            "channels": int(synthetic.images.shape[1]),
            "image_size": int(synthetic.images.shape[2]),
            "mean": list(info["mean"]),
            "std": list(info["std"]),
            "zca": bool(info.get("zca", False)),
            "zca_eps": info.get("zca_eps"),
            "lr": synthetic.lr,
            "labels": "soft" if synthetic.labels.dim() == 2 else "hard",
            "float_file": FLOAT_FILE,
            "pixels": "network input = (png / 255 - mean) / std per channel"
                      + (", then ZCA-whitened (kornia ZCAWhitening, eps zca_eps) as fitted on "
                         "the dataset's normalised train images" if info.get("zca") else ""),
            "png": {"bits": 8, **asdict(loss)},
            "dataset_info": info,
        }
        atomic_write_text(tmp / META, json.dumps(meta, indent=2) + "\n")
        old = None
        if out.exists():  # an earlier export (checked above): moved aside, then removed
            old = out.with_name(f".{out.name}.old-{tmp.name}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return loss


def _read_meta(folder: Path) -> dict | None:
    """The folder's set.json (None without one); ValueError naming it when it is not ours."""
    path = folder / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tesla_func set folder's {META} (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    missing = [key for key in ("dataset_info", "class_folders", "lr") if key not in meta]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return meta


def load_set_folder(
    folder: str | Path,
    *,
    from_pngs: bool = False,
    dataset: Dataset | str | None = None,
    root: str | Path | None = None,
) -> SyntheticSet:
    """An image folder back as a :class:`~tesla_func.synthetic.SyntheticSet` (module docstring).

    folder: one ``tesla-func export`` wrote, or any folder of class folders of PNG/JPEG images.
    from_pngs: read the 8-bit PNGs even where the exact float file is there (its labels and lr
        are kept; the images must be as many).
    dataset: the dataset the images belong to (a loaded one, or its name, loaded from ``root``):
        needed for a folder without set.json; for PNGs of a ZCA-whitened set, else reloaded
        from set.json's record (``root``: where its files are).

    Raises FileNotFoundError (no such folder; a whitened set's dataset not found) and ValueError
    naming what is wrong: no class folders, an empty class, an unreadable image, images of
    another size or channel count than the dataset's, class folders that are not set.json's or
    not as many as the dataset's classes, no dataset for a folder without set.json.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    meta = _read_meta(folder)
    float_path = folder / (meta["float_file"] if meta else FLOAT_FILE)
    exact = load_synthetic(float_path) if float_path.is_file() else None
    if exact is not None and not from_pngs:
        return exact
    names, png, labels = read_class_folders(folder)
    loaded = dataset if isinstance(dataset, Dataset) else None
    if meta is not None:
        info = meta["dataset_info"]
        if list(names) != list(meta["class_folders"]):
            raise ValueError(f"the class folders of {folder} ({list(names)}) are not those its "
                             f"{META} lists ({meta['class_folders']})")
    elif exact is not None:
        info = exact.header.get("dataset_info") or {}
    else:
        if dataset is None:
            raise ValueError(
                f"{folder} has no {META} (`tesla-func export` did not write it): name the dataset "
                "its images belong to (dataset=NAME, or --dataset NAME): its mean, std and ZCA "
                "turn the pixels into network inputs, and its test set tests them")
        loaded = loaded or load_dataset(dataset, root)
        info = loaded.info.to_dict()
        if len(names) != loaded.info.num_classes:
            raise ValueError(
                f"{folder} has {len(names)} class folders ({', '.join(names[:12])}), but dataset "
                f"{loaded.info.name!r} has {loaded.info.num_classes} classes: class k is the k-th "
                "folder in sorted name order, as torchvision's ImageFolder numbers them")
    png = _channels_of(png, info, folder)
    if png.shape[2] != info["image_size"]:
        raise ValueError(f"the images in {folder} are {png.shape[3]}x{png.shape[2]}, dataset "
                         f"{info.get('name')!r} has {info['image_size']}x{info['image_size']}")
    pixels = torch.from_numpy(png).float().div_(255)
    images = inputs_from_info(pixels, info, dataset=loaded, root=root)
    if exact is not None:
        if len(exact.images) != len(images):
            raise ValueError(f"{folder} holds {len(images)} images but its {float_path.name} "
                             f"{len(exact.images)}")
        return SyntheticSet(images.to(exact.images.dtype), exact.labels, exact.lr,
                            exact.label_logits,
                            {**exact.header, "images_from": f"8-bit PNGs in {folder}"})
    counts = np.bincount(labels, minlength=len(names))
    header = {
        "config": {},
        "dataset_info": info,
        "ipc": int(counts[0]) if (counts == counts[0]).all() else None,
        "images_from": f"8-bit PNGs in {folder}",
        "lr_recorded": meta is not None,
    }
    return SyntheticSet(images, torch.from_numpy(labels), float(meta["lr"]) if meta else
                        FOREIGN_LR, None, header)


def _channels_of(png: np.ndarray, info: dict, folder: Path) -> np.ndarray:
    """(N, C, S, S) with the dataset's channel count: grey saved as RGB (three equal channels,
    as torchvision's loader saves it) becomes grey again; other mismatches are refused."""
    channels = int(info["channels"])
    if png.shape[1] == channels:
        return png
    if channels == 1 and png.shape[1] == 3 and (png == png[:, :1]).all():
        return png[:, :1]
    kind = {1: "grey", 3: "colour"}
    raise ValueError(f"the images in {folder} are {kind.get(png.shape[1], png.shape[1])}, "
                     f"dataset {info.get('name')!r} is {kind.get(channels, channels)}")
