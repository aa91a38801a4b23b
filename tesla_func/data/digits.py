"""scikit-learn's bundled 8x8 digits: no files to find, a fixed train/test split.

1797 grey 8x8 images of the digits 0..9, pixel values 0..16 (so 16 maps to 1.0). Sample i is a
test sample iff ``i % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1``: 1438 train, 359 test, the same
split every time.

The reader interface (:mod:`tesla_func.data`): :func:`find` and :func:`read`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tesla_func.data.types import RawArrays

DIGITS_TEST_EVERY = 5  # sample i is a test sample iff i % 5 == 4: 1438 train, 359 test, fixed


def find(folder: Path) -> Path:
    """Any folder will do: the images come with scikit-learn."""
    return folder


def read(_: Path) -> RawArrays:
    """The digits, split: 1438 train and 359 test uint8 images (N, 1, 8, 8), values 0..16."""
    # Imported here, not at the top: scikit-learn takes over a second to import, and only this
    # dataset needs it (every `import tesla_func.data` would pay for it).
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    test = np.arange(len(labels)) % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    return RawArrays(
        train_x=images[~test],
        train_y=labels[~test],
        test_x=images[test],
        test_y=labels[test],
        class_names=tuple(str(d) for d in range(10)),
        max_value=16.0,
    )
