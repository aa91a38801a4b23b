"""Evaluation protocol (tesla_func.evaluate): vmap engine vs plain loop, seeds, bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from sklearn.datasets import load_digits

from tesla_func.augment import DSA
from tesla_func.evaluate import (
    EvalConfig,
    EvalResult,
    evaluate,
    evaluate_whole_set,
)
from tesla_func.sampling import per_class_indices
from tesla_func.results import load_results, save_results

# A tiny ConvNet on 8x8 digits: two blocks of 8 maps (8 -> 4 -> 2 px).
TINY = EvalConfig(
    arch_kwargs={"width": 8, "depth": 2},
    epochs=4,
    lr=0.05,
    batch_size=16,
    num_models=2,
    use_vmap=True,
    keep_params=True,
    progress=False,
)


@pytest.fixture(scope="module")
def digits():
    """(train images (1000, 1, 8, 8) float64 in [0, 1], labels, test images (797, ...), labels)."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float64).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x[:1000], y[:1000], x[1000:], y[1000:]


def _flip_and_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    noise = 0.05 * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return torch.where(flip[:, None, None, None], x.flip(-1), x) + noise


def _assert_same_params(a: EvalResult, b: EvalResult) -> None:
    assert a.final_params.keys() == b.final_params.keys()
    for key in a.final_params:
        torch.testing.assert_close(a.final_params[key], b.final_params[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("label_kind", ["hard", "soft"])
@pytest.mark.parametrize("augment", [None, "dsa"])
def test_vmap_engine_matches_the_loop(digits, label_kind, augment):
    x, y, xt, yt = digits
    x, y = x[:40], y[:40]  # 3 batches of 16, 16 and 8: a short last batch
    labels = (
        y if label_kind == "hard" else torch.softmax(torch.randn(40, 10, dtype=torch.float64), 1)
    )
    aug = DSA() if augment == "dsa" else None
    fast = evaluate(x, labels, xt, yt, TINY, aug, num_classes=10)
    slow = evaluate(
        x, labels, xt, yt, dataclasses.replace(TINY, use_vmap=False), aug, num_classes=10
    )
    assert (fast.engine, slow.engine) == ("vmap", "loop")
    _assert_same_params(fast, slow)
    assert fast.accuracies == slow.accuracies
    # Each model has its own init and batch order: the two trained models differ.
    w = fast.final_params["classifier.weight"]
    assert not torch.allclose(w[0], w[1])


def test_augmentation_changes_training(digits):
    x, y, xt, yt = digits
    plain = evaluate(x[:40], y[:40], xt, yt, TINY)
    augmented = evaluate(x[:40], y[:40], xt, yt, TINY, _flip_and_noise)
    assert not torch.allclose(
        plain.final_params["classifier.weight"], augmented.final_params["classifier.weight"]
    )


def test_model_k_does_not_depend_on_how_many_models(digits):
    x, y, xt, yt = digits
    one = evaluate(x[:40], y[:40], xt, yt, dataclasses.replace(TINY, num_models=1), _flip_and_noise)
    three = evaluate(
        x[:40], y[:40], xt, yt, dataclasses.replace(TINY, num_models=3), _flip_and_noise
    )
    assert one.accuracies[0] == three.accuracies[0]
    for key, value in one.final_params.items():
        torch.testing.assert_close(value[0], three.final_params[key][0])


def test_same_seed_same_result_and_other_seed_differs(digits):
    x, y, xt, yt = digits
    a = evaluate(x[:40], y[:40], xt, yt, TINY, _flip_and_noise)
    b = evaluate(x[:40], y[:40], xt, yt, TINY, _flip_and_noise)
    c = evaluate(x[:40], y[:40], xt, yt, dataclasses.replace(TINY, seed=1), _flip_and_noise)
    for key in a.final_params:
        assert torch.equal(a.final_params[key], b.final_params[key])
    assert not torch.equal(a.final_params["classifier.weight"], c.final_params["classifier.weight"])


def test_global_rng_is_untouched(digits):
    x, y, xt, yt = digits
    state = torch.get_rng_state()
    evaluate(x[:20], y[:20], xt[:50], yt[:50], dataclasses.replace(TINY, epochs=1), _flip_and_noise)
    assert torch.equal(state, torch.get_rng_state())


def test_training_learns_digits(digits):
    x, y, xt, yt = digits
    index = per_class_indices(y, 20, torch.Generator().manual_seed(0))
    sub_x, sub_y = x[index], y[index]  # 200 images
    cfg = EvalConfig(
        arch_kwargs={"width": 16, "depth": 2},
        epochs=30,
        lr=0.05,
        batch_size=64,
        num_models=2,
        progress=False,
    )
    result = evaluate(sub_x.float(), sub_y, xt.float(), yt, cfg)
    assert result.mean > 0.75, result  # chance is 0.10
    assert 0 <= result.std < 0.1
    assert result.train_size == 200


def test_batch_norm_models_use_the_loop(digits):
    x, y, xt, yt = digits
    cfg = dataclasses.replace(TINY, arch_kwargs={"width": 8, "depth": 2, "norm": "batch"})
    result = evaluate(x[:40], y[:40], xt, yt, cfg)
    assert result.engine == "loop"
    assert all(0 <= a <= 1 for a in result.accuracies)


def test_whole_set_path_uses_every_image(digits):
    x, y, xt, yt = digits
    result = evaluate_whole_set(
        x[:100], y[:100], xt[:100], yt[:100], dataclasses.replace(TINY, epochs=1, num_models=1)
    )
    assert result.train_size == 100 and len(result.accuracies) == 1


def test_lr_schedule_drops_at_half():
    cfg = EvalConfig(epochs=10, lr=0.2)
    assert [cfg.lr_at(e) for e in (0, 4)] == [0.2, 0.2]
    assert [cfg.lr_at(e) for e in (5, 9)] == pytest.approx([0.02, 0.02])
    assert EvalConfig(epochs=10, lr=0.2, lr_decay_epoch=8).lr_at(7) == 0.2


def test_learned_beta_tensor_becomes_a_float():
    cfg = EvalConfig(lr=torch.tensor(0.003, requires_grad=True))
    assert isinstance(cfg.lr, float) and cfg.lr == pytest.approx(0.003)


def test_to_xarray_round_trips_with_config_and_provenance(digits, tmp_path):
    x, y, xt, yt = digits
    result = evaluate(x[:20], y[:20], xt[:50], yt[:50], dataclasses.replace(TINY, epochs=1))
    ds = result.to_xarray(method="random", ipc=2)
    assert ds["accuracy"].dims == ("method", "ipc", "model")
    assert ds["accuracy"].values.ravel().tolist() == list(result.accuracies)
    back = load_results(save_results(ds, tmp_path / "eval.nc"))
    assert back.attrs["config"]["arch_kwargs"] == {"width": 8, "depth": 2}
    assert back.attrs["config"]["lr"] == TINY.lr
    assert back.attrs["engine"] == "vmap" and back.attrs["accuracy_mean"] == pytest.approx(
        result.mean
    )
    assert "git_revision" in back.attrs and "version_torch" in back.attrs
    assert result.std == pytest.approx(
        math.sqrt(sum((a - result.mean) ** 2 for a in result.accuracies) / 2)
    )


def _bad_inputs(digits):
    x, y, xt, yt = digits
    x, y = x[:20], y[:20]
    logits = torch.randn(20, 10, dtype=torch.float64)
    return {
        "empty": ((x[:0], y[:0], xt, yt), "empty"),
        "label out of range": ((x, torch.where(y == 3, 10, y), xt, yt), r"\[0, 10\)"),
        "negative label": ((x, torch.where(y == 3, -1, y), xt, yt), r"\[0, 10\)"),
        "length mismatch": ((x, y[:19], xt, yt), r"\(N,\) or \(N, K\) with N = 20"),
        "logits as labels": ((x, logits, xt, yt), "softmax"),
        "float hard labels": ((x, y.double(), xt, yt), "integer dtype"),
        "test shape": (
            (x, y, torch.zeros(5, 1, 16, 16), yt[:5]),
            r"built for the training images' \(1, 8, 8\)",
        ),
        "test labels": ((x, y, xt, yt[:-1]), "test_labels"),
        "int images": ((x.long(), y, xt, yt), "float"),
    }


BAD_CASES = [
    "empty",
    "label out of range",
    "negative label",
    "length mismatch",
    "logits as labels",
    "float hard labels",
    "test shape",
    "test labels",
    "int images",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_inputs_raise_clear_errors(digits, case):
    cases = _bad_inputs(digits)
    assert set(cases) == set(BAD_CASES)
    args, words = cases[case]
    with pytest.raises(ValueError, match=words):
        evaluate(*args, TINY, num_classes=10)


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", 0.0),
        ("lr", -0.1),
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("epochs", 0),
        ("num_models", 0),
        ("batch_size", -1),
        ("seed", -1),
        ("momentum", float("nan")),
    ],
)
def test_bad_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        EvalConfig(**{field: value})


def test_default_engine_is_the_loop_on_cpu(digits):
    x, y, xt, yt = digits
    result = evaluate(
        x[:20], y[:20], xt[:50], yt[:50], dataclasses.replace(TINY, epochs=1, use_vmap=None)
    )
    assert result.engine == "loop"
