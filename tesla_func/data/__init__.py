"""Real image datasets behind one registry: ``load_dataset(name, root=None)``.

Every dataset comes back the same way: train and test images as float32 ``(N, C, H, W)`` tensors,
normalised per channel by a fixed mean/std (and ZCA-whitened where asked), labels as int64
``(N,)``, and a :class:`DatasetInfo` with classes, shape and the normalisation, so that a synthetic
set can be turned back into pixels with :meth:`Dataset.to_pixels`. A fixed share of every class
of the training files is held out as the validation split (:func:`validation_indices`).

=================  ==========================================================  ==================
name               files read (standard formats)                               default ZCA
=================  ==========================================================  ==================
``fashion-mnist``  the four IDX ``*-ubyte.gz`` files (or unzipped)              no
``digits``         scikit-learn's bundled 8x8 digits, no files                  no
``cifar10``        ``cifar-10-python.tar.gz`` or its ``cifar-10-batches-py/``   yes (eps 0.1)
``cifar100``       ``cifar-100-python.tar.gz`` or its ``cifar-100-python/``     yes (eps 0.1)
``imagenet64``     downsampled ImageNet ``train_data_batch_*.npz``,              no
                   ``val_data.npz`` (Chrabaszcz et al. 2017)
``folder``         your own PNG/JPEG images, one sub-folder per class            no
                   (``root=`` only; :mod:`tesla_func.data.image_folder`)
=================  ==========================================================  ==================

Where the files are looked for, in order:

1. ``root=`` if given (that folder and ``root/<name>``), and nowhere else;
2. every folder in the environment variable ``TESLA_FUNC_DATA`` (``os.pathsep``-separated), as
   ``<folder>/<name>`` and ``<folder>`` itself;
3. the user folder ``$XDG_DATA_HOME/tesla_func/<name>`` (``~/.local/share/tesla_func/<name>``);
4. the dataset's system folder: Fashion-MNIST's Debian package ``dataset-fashion-mnist``
   installs into ``/usr/share/datasets/fashion-mnist``.

Nothing is downloaded: CIFAR and ImageNet cannot be fetched on the machines this was written on,
and a missing dataset raises ``FileNotFoundError`` saying where it looked and how to get it.

The modules, each with one job:

``types``
    :class:`Dataset`, :class:`DatasetInfo`, :class:`DatasetShape`, and ``RawArrays``, what every
    reader returns.
``registry``
    the table of datasets, one ``DatasetSpec`` row each; where files are looked for
    (:func:`search_dirs`, :func:`locate`), :func:`shape` without reading them.
``load``
    :func:`load_dataset` (validation split, normalisation, kornia ZCA, the same for every
    dataset), and reloading and checking the dataset a file recorded (:func:`load_dataset_like`,
    :func:`check_same_dataset`, :func:`pixels_from_info` and its inverse
    :func:`inputs_from_info`).
``idx``, ``digits``, ``cifar``, ``imagenet64``, ``image_folder``
    one reader per file format; each module's docstring describes its format. The CIFAR files
    are pickles, read only through ``cifar``'s restricted unpickler.

To add a dataset:

1. Write a reader module here with two functions: ``find(folder) -> Path | None`` (the file or
   folder to read if ``folder`` holds the dataset, without reading it) and
   ``read(path, **options) -> RawArrays`` (uint8 ``(N, C, H, W)`` images and int64 labels of
   train and test, the class names, and ``max_value``, the pixel value that means white). Bad
   files raise ValueError naming the file; :func:`~tesla_func.data.types.check_labels` checks
   labels. Say in its docstring what files it reads.
2. Add its ``DatasetSpec`` row to the table in :mod:`tesla_func.data.registry`: name, summary,
   shape, the reader's ``find`` and ``read``, how to get the files, mean/std (or ``None``: the
   train images'), ZCA default and validation images per class.

Everything else (searching, the validation split, normalisation, ZCA, the names ``--dataset``
accepts, ``tesla-func data``, the planner's shapes) follows from the row; the table at the top of
this docstring documents it for readers.
"""

from tesla_func.data.digits import DIGITS_TEST_EVERY
from tesla_func.data.idx import FASHION_CLASSES, read_idx
from tesla_func.data.image_folder import (
    FOLDER_EXTENSIONS,
    FOLDER_FORMATS,
    FOLDER_RESAMPLE,
    FOLDER_SPLIT_SEED,
    FOLDER_TEST_EVERY,
    read_class_folders,
)
from tesla_func.data.load import (
    VALIDATION_SEED,
    ZCA_EPS,
    check_same_dataset,
    fit_zca,
    inputs_from_info,
    load_dataset,
    load_dataset_like,
    pixels_from_info,
    validation_indices,
)
from tesla_func.data.registry import (
    DATASETS,
    ENV_VAR,
    FASHION_MNIST_DIR,
    Availability,
    available,
    dataset_options,
    locate,
    search_dirs,
    shape,
)
from tesla_func.data.types import Dataset, DatasetInfo, DatasetShape

__all__ = [
    "DATASETS",
    "DIGITS_TEST_EVERY",
    "ENV_VAR",
    "FASHION_CLASSES",
    "FASHION_MNIST_DIR",
    "FOLDER_EXTENSIONS",
    "FOLDER_FORMATS",
    "FOLDER_RESAMPLE",
    "FOLDER_SPLIT_SEED",
    "FOLDER_TEST_EVERY",
    "VALIDATION_SEED",
    "ZCA_EPS",
    "Availability",
    "Dataset",
    "DatasetInfo",
    "DatasetShape",
    "available",
    "check_same_dataset",
    "dataset_options",
    "fit_zca",
    "inputs_from_info",
    "load_dataset",
    "load_dataset_like",
    "locate",
    "pixels_from_info",
    "read_class_folders",
    "read_idx",
    "search_dirs",
    "shape",
    "validation_indices",
]
