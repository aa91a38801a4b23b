"""Your own images: a folder of class folders of PNG/JPEG files, decoded by Pillow.

``load_dataset("folder", root=DIR, image_size=S)``:

- **Layout.** ``DIR/<class>/<image>``: one sub-folder per class; the class names are the sorted
  folder names, and label k is the k-th of them. Or ``DIR/train/<class>/...`` with
  ``DIR/test/<class>/...``, the same class folders in both (other folders beside ``train/`` and
  ``test/``, such as ``val/``, are not read). Images are the files directly in a class folder
  ending in ``.png``, ``.jpg`` or ``.jpeg`` (any case), decoded only as PNG or JPEG whatever the
  extension says; names starting with ``.`` and all other files and folders are skipped.
- **Where.** Read only from ``root`` itself (not ``root/folder``): ``TESLA_FUNC_DATA`` and the
  user folder are not searched, so ``search_dirs("folder")`` is empty without a root.
- **Order.** Train and test images come class by class (label order), by file name within one.
- **Split.** Without ``train/`` and ``test/``, each class of n >= 2 images holds out
  ``max(1, n // 6)`` as test (:data:`FOLDER_TEST_EVERY`): the files whose SHA-256 of
  ``"<seed>:<class>/<file name>"`` is smallest, with seed :data:`FOLDER_SPLIT_SEED` (0). The
  split depends only on the class and file names: not on the order files were written or listed,
  nor on numpy or torch versions; adding an image moves at most one other image of its class.
- **Size.** ``image_size=S`` resizes every image to S x S with Pillow's bilinear filter
  (``Image.Resampling.BILINEAR``, which antialiases when shrinking); a non-square image is
  stretched, not cropped. Without it, all images must share one square size, which is kept.
- **Channels.** Grey (PNG/JPEG modes ``1``, ``L``, ``LA``) gives 1 channel; colour (``RGB``,
  ``RGBA``, ``CMYK``, ``YCbCr``, and palette ``P``/``PA`` images) gives 3. Alpha is dropped, not
  composited; EXIF orientation is applied. A folder mixing grey and colour images is refused
  (the error names one of each); so are 16-bit and float images.
- **Normalisation.** Mean and std per channel of the (resized) train images; ZCA off by default.
- **Name.** ``info.name`` is ``"folder"`` whatever the root (expert files and configs record the
  dataset by the name given to ``load_dataset``); ``info.source`` is the root's absolute path,
  and ``info.class_names`` the folder names, for errors that name a class.

The reader interface (:mod:`tesla_func.data`): :func:`find` and :func:`read` (which takes the
option ``image_size``), and :func:`explain_missing` for the error when ``root`` is not such a
folder. :func:`read_class_folders` reads one class-folder tree whole, without a split (a
synthetic set exported as images: :mod:`tesla_func.export`).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from tesla_func.data.types import RawArrays

FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg")  # image files, matched in any case
FOLDER_FORMATS = ("PNG", "JPEG")  # the only decoders Pillow may use, whatever the extension
FOLDER_TEST_EVERY = 6  # without train/ + test/: max(1, n // 6) of a class's n images are test
FOLDER_SPLIT_SEED = 0  # salt of the split's hash (see _split_class)
FOLDER_RESAMPLE = Image.Resampling.BILINEAR  # antialiased when shrinking (Pillow convolves)
_GREY_MODES = frozenset({"1", "L", "LA", "La"})  # -> "L", 1 channel
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "P", "PA"})  # -> "RGB"
# what the folder must hold, in words: for errors here and the registry's how-to-get hint
LAYOUT = (
    "one sub-folder of PNG/JPEG images per class, or train/ and test/ folders holding such "
    "class folders"
)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")  # .git, .ipynb_checkpoints, macOS ._foo.png


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if _visible(p) and p.is_dir()), key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    """The images directly in ``folder``, sorted by name."""
    return sorted(
        (
            p
            for p in folder.iterdir()
            if _visible(p) and p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file()
        ),
        key=lambda p: p.name,
    )


def _is_pair(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def find(folder: Path) -> Path | None:
    """``folder`` (absolute) if some class folder in it (or in its train/) holds an image."""
    top = folder / "train" if _is_pair(folder) else folder
    has_image = any(
        any(_visible(p) and p.suffix.lower() in FOLDER_EXTENSIONS for p in d.iterdir())
        for d in _class_dirs(top)
    )
    return folder.absolute() if has_image else None


def explain_missing(root: Path | None) -> None:
    """Raise the error that says why ``root`` is not a folder dataset."""
    if root is None:
        raise FileNotFoundError(
            "dataset 'folder' is read only from root=DIR (--root DIR): a folder holding "
            f"{LAYOUT}"
        )
    _folder_layout(root)  # raises, naming what is wrong
    raise FileNotFoundError(f"{root} holds no PNG/JPEG image in its class folders")


def _class_names(folder: Path) -> tuple[str, ...]:
    names = tuple(d.name for d in _class_dirs(folder))
    if not names:
        raise ValueError(
            f"{folder} has no class folders: the folder dataset needs {LAYOUT}"
        )
    return names


def _class_images(folder: Path, name: str) -> list[Path]:
    files = _image_files(folder)
    if not files:
        raise ValueError(
            f"class {name!r} is empty: {folder} holds no {'/'.join(FOLDER_EXTENSIONS)} image"
        )
    return files


def _split_class(name: str, files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, test) files of one class, both in name order: the fixed, seeded split.

    The test files are the ``max(1, n // FOLDER_TEST_EVERY)`` whose SHA-256 of
    ``"<FOLDER_SPLIT_SEED>:<class>/<file name>"`` is smallest: a function of the names alone.
    """
    if len(files) < 2:
        raise ValueError(
            f"class {name!r} has 1 image ({files[0]}); the fixed split needs at least 2 "
            "(one held out as test): add images, or give train/ and test/ folders"
        )
    n_test = max(1, len(files) // FOLDER_TEST_EVERY)
    key = {
        p: hashlib.sha256(f"{FOLDER_SPLIT_SEED}:{name}/{p.name}".encode()).hexdigest()
        for p in files
    }
    test = set(sorted(files, key=lambda p: (key[p], p.name))[:n_test])
    return [p for p in files if p not in test], [p for p in files if p in test]


def _folder_layout(root: Path) -> tuple[tuple[str, ...], list[list[Path]], list[list[Path]]]:
    """(class names, train files per class, test files per class); bad layouts are named."""
    if not root.exists():
        raise FileNotFoundError(f"folder dataset root {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"folder dataset root {root} is a file, not a folder")
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() != test_dir.is_dir():
        there, absent = ("train", "test") if train_dir.is_dir() else ("test", "train")
        raise ValueError(
            f"{root} has {there}/ but no {absent}/: give both, with the same class folders, or "
            "neither (one folder per class, split here)"
        )
    if not _is_pair(root):
        names = _class_names(root)
        split = [_split_class(n, _class_images(root / n, n)) for n in names]
        return names, [train for train, _ in split], [test for _, test in split]
    names = _class_names(train_dir)
    test_names = _class_names(test_dir)
    for name in names:
        if name not in test_names:
            raise ValueError(f"class {name!r} is missing from {test_dir} (it is in {train_dir})")
    for name in test_names:
        if name not in names:
            raise ValueError(f"class {name!r} is in {test_dir} but missing from {train_dir}")
    train = [_class_images(train_dir / n, n) for n in names]
    test = [_class_images(test_dir / n, n) for n in names]
    return names, train, test


def _open_image(path: Path) -> Image.Image:
    """Decode one file (PNG or JPEG only), EXIF orientation applied. Errors name the file."""
    try:
        with Image.open(path, formats=FOLDER_FORMATS) as im:
            im.load()
            return ImageOps.exif_transpose(im)  # a new, loaded image: the file can close
    except (OSError, SyntaxError, ValueError, EOFError, struct.error,
            Image.DecompressionBombError) as err:
        raise ValueError(f"{path} is not a readable PNG/JPEG image ({err})") from err


def _decode_images(files: list[Path], image_size: int | None) -> np.ndarray:
    """Files -> uint8 (N, C, S, S), C = 1 or 3 for all; mixed kinds and sizes are named."""
    first: dict[str, tuple[Path, str]] = {}  # "grey" / "colour" -> the first such file, its mode
    out = None
    for i, path in enumerate(files):
        im = _open_image(path)
        if im.mode in _GREY_MODES:
            kind = "grey"
        elif im.mode in _COLOUR_MODES:
            kind = "colour"
        else:
            raise ValueError(
                f"{path} has Pillow mode {im.mode!r} (16-bit or float pixels?); only 8-bit grey "
                "or colour images are read: save it as 8-bit"
            )
        first.setdefault(kind, (path, im.mode))
        if len(first) == 2:
            (grey, grey_mode), (colour, colour_mode) = first["grey"], first["colour"]
            raise ValueError(
                f"mixed channel counts: {grey} is grey (mode {grey_mode}) but {colour} is colour "
                f"(mode {colour_mode}); convert the images to one kind"
            )
        if kind == "colour" and im.mode in ("P", "PA"):
            im = im.convert("RGBA")  # a palette with transparency: through RGBA, as Pillow asks
        im = im.convert("L" if kind == "grey" else "RGB")  # alpha dropped
        if out is None:
            if image_size is None and im.width != im.height:
                raise ValueError(
                    f"{path} is {im.width}x{im.height}, not square: pass image_size=S to resize "
                    "every image to SxS (stretched)"
                )
            side = image_size or im.width
            out = np.empty((len(files), len(im.getbands()), side, side), dtype=np.uint8)
            first_size = (path, im.size)
        if image_size is None and im.size != first_size[1]:
            (w0, h0), (w, h) = first_size[1], im.size
            raise ValueError(
                f"images differ in size: {first_size[0]} is {w0}x{h0} but {path} is {w}x{h}; "
                "pass image_size=S to resize every image to SxS"
            )
        if im.size != (out.shape[3], out.shape[2]):
            im = im.resize((out.shape[3], out.shape[2]), FOLDER_RESAMPLE)
        pixels = np.asarray(im)  # (S, S) grey or (S, S, 3) colour
        out[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return out


def read(root: Path, image_size: int | None = None) -> RawArrays:
    """The images under ``root`` -> uint8 (N, C, S, S) train and test images, labels in class
    order, the class folder names (the module docstring says how)."""
    if image_size is not None and (
        not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    names, train, test = _folder_layout(root)
    train_files = [p for files in train for p in files]
    images = _decode_images(train_files + [p for files in test for p in files], image_size)

    def labels(per_class: list[list[Path]]) -> np.ndarray:
        return np.repeat(np.arange(len(names), dtype=np.int64), [len(f) for f in per_class])

    return RawArrays(
        train_x=images[: len(train_files)],
        train_y=labels(train),
        test_x=images[len(train_files) :],
        test_y=labels(test),
        class_names=names,
    )


def read_class_folders(root: str | Path) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """One folder of class folders read whole, without a split or resizing: (the class folder
    names, uint8 (N, C, S, S) images, int64 (N,) labels).

    As torchvision's ``ImageFolder`` numbers them, label k is the k-th class folder in sorted
    name order, and images come class by class, by file name within one. Unlike it, only the
    files directly in a class folder are read, only PNG/JPEG, and names starting with ``.`` are
    skipped (see the module docstring). Errors name the folder, class or file: no class folders,
    an empty class, an unreadable image, grey and colour mixed, sizes that differ.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    names = _class_names(root)
    files = [_class_images(root / name, name) for name in names]
    images = _decode_images([p for per_class in files for p in per_class], None)
    labels = np.repeat(np.arange(len(names), dtype=np.int64), [len(f) for f in files])
    return names, images, labels
