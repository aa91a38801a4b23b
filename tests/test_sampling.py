"""Random draws from explicit generators (tesla_func.sampling)."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from tesla_func.sampling import draw_minibatches, per_class_indices, seeded_generator


def test_per_class_indices_draws_ipc_distinct_images_per_class():
    y = torch.from_numpy(load_digits().target).long()
    index = per_class_indices(y, 3, torch.Generator().manual_seed(0))
    assert index.shape == (30,) and len(set(index.tolist())) == 30
    assert torch.equal(y[index], torch.arange(10).repeat_interleave(3))
    again = per_class_indices(y, 3, torch.Generator().manual_seed(0))
    other = per_class_indices(y, 3, torch.Generator().manual_seed(1))
    assert torch.equal(index, again) and not torch.equal(index, other)


def test_per_class_indices_names_the_short_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    with pytest.raises(ValueError, match=r"ipc 4 is larger than class 1 \('bee'\), which has 3"):
        per_class_indices(labels, 4, torch.Generator(), class_names=("ant", "bee", "cat"))
    with pytest.raises(ValueError, match="empty set"):
        per_class_indices(labels[:0], 1, torch.Generator())


def test_minibatches_do_not_overlap_within_a_permutation():
    gen = torch.Generator().manual_seed(0)
    batches, left = draw_minibatches(torch.zeros(0, dtype=torch.long), 10, 3, 3, gen)
    assert [len(b) for b in batches] == [3, 3, 3] and len(left) == 1
    assert len(set(torch.cat(batches).tolist())) == 9
    more, left = draw_minibatches(left, 10, 3, 1, gen)  # 1 left < 3: a fresh permutation
    assert len(more[0]) == 3 and len(left) == 7
    with pytest.raises(ValueError, match=r"minibatch size 11 must lie in \[1, 10\]"):
        draw_minibatches(left, 10, 11, 1, gen)


def test_streams_depend_on_their_key_only():
    a = torch.randint(0, 2**30, (4,), generator=seeded_generator(0, 1, 2))
    b = torch.randint(0, 2**30, (4,), generator=seeded_generator(0, 1, 2))
    c = torch.randint(0, 2**30, (4,), generator=seeded_generator(0, 2, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
