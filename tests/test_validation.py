"""Bad input to match_trajectory gets a clear error naming the argument."""

from __future__ import annotations

import math

import pytest
import torch

from tesla_func import ConvNet, match_trajectory
from tesla_func.augment import DSA
from tesla_func.models import init_params


@pytest.fixture
def args():
    gen = torch.Generator().manual_seed(0)
    model = ConvNet(channels=1, num_classes=3, image_size=8, width=4, depth=2)
    start = init_params(model, gen)
    target = {k: v + 0.1 for k, v in start.items()}
    images = torch.randn(6, 1, 8, 8, generator=gen)
    labels = torch.arange(6) % 3
    batches = [torch.arange(3), torch.arange(3, 6)]
    return dict(
        model=model,
        start=start,
        target=target,
        images=images,
        labels=labels,
        beta=torch.tensor(0.01),
        batches=batches,
    )


def call(args, **changes):
    return match_trajectory(**{**args, **changes})


def test_valid_arguments_run(args):
    result = call(args)
    assert result.images_grad.shape == args["images"].shape
    assert result.labels_grad is None
    assert math.isfinite(float(result.loss))


@pytest.mark.parametrize("method", ["tesla", "exact", "unrolled"])
def test_known_methods_accepted(args, method):
    assert call(args, method=method).loss > 0


def test_unknown_method_lists_known(args):
    with pytest.raises(ValueError, match=r"unknown method 'adjoint'.*exact.*tesla.*unrolled"):
        call(args, method="adjoint")


def test_missing_and_unexpected_keys_named(args):
    start = dict(args["start"])
    weight = start.pop("classifier.weight")
    start["classifier.wieght"] = weight
    with pytest.raises(
        ValueError,
        match=r"start.*missing keys \['classifier.weight'\].*"
        r"unexpected keys \['classifier.wieght'\]",
    ):
        call(args, start=start)


def test_shape_mismatch_named(args):
    target = dict(args["target"])
    target["classifier.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"target\['classifier.bias'\] has shape \(5,\)"):
        call(args, target=target)


def test_identical_start_and_target(args):
    with pytest.raises(ValueError, match="start and target are identical"):
        call(args, target=args["start"])


@pytest.mark.parametrize(
    "batches, message",
    [
        ([], "batches is empty"),
        ([torch.arange(0)], r"batches\[0\] is empty"),
        ([torch.tensor([0, 6])], r"batches\[0\] holds indices in \[0, 6\].*\[0, 5\]"),
        ([torch.tensor([-1, 2])], r"batches\[0\] holds indices in \[-1, 2\]"),
    ],
)
def test_bad_batches(args, batches, message):
    with pytest.raises(ValueError, match=message):
        call(args, batches=batches)


def test_float_index_batches_rejected(args):
    with pytest.raises(TypeError, match=r"batches\[1\] must be a 1-D int64"):
        call(args, batches=[torch.arange(3), torch.arange(3.0)])


@pytest.mark.parametrize("beta", [0.0, -0.01, float("nan"), float("inf")])
def test_bad_beta(args, beta):
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        call(args, beta=torch.tensor(beta))


def test_beta_must_be_scalar(args):
    with pytest.raises(TypeError, match="beta must be a floating-point scalar"):
        call(args, beta=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_images(args, bad):
    images = args["images"].clone()
    images[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="images contain NaN or inf"):
        call(args, images=images)


def test_labels_out_of_range(args):
    with pytest.raises(ValueError, match=r"labels hold classes in \[0, 3\].*3 outputs"):
        call(args, labels=torch.tensor([0, 1, 2, 3, 0, 1]))


def test_labels_wrong_shape(args):
    with pytest.raises(ValueError, match=r"int labels are class indices of shape \(N,\)"):
        call(args, labels=torch.zeros(6, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"label logits of shape \(N, K\) = \(6, 3\)"):
        call(args, labels=torch.zeros(6, 4))


def test_labels_wrong_dtype(args):
    with pytest.raises(TypeError, match="labels must be int64"):
        call(args, labels=torch.zeros(6, dtype=torch.int32))


def test_dtype_mismatch_named(args):
    with pytest.raises(
        TypeError,
        match=r"start\['features.0.weight'\] is torch.float32.*"
        r"images are torch.float64",
    ):
        call(args, images=args["images"].double())


def test_state_stride_must_be_positive(args):
    with pytest.raises(ValueError, match="state_stride must be an int >= 1"):
        call(args, method="exact", state_stride=0)


def test_model_must_be_module(args):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        call(args, model=lambda x: x)


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_keep_graphs_must_be_a_nonnegative_int(args, value):
    with pytest.raises(ValueError, match=r"keep_graphs must be an int >= 0 \(the number of final"):
        call(args, method="exact", keep_graphs=value)


def test_keep_graphs_larger_than_steps_is_clamped(args):
    assert float(call(args, method="tesla", keep_graphs=100).loss) > 0


@pytest.mark.parametrize("value", [0, -3, 2.0, False])
def test_microbatch_size_must_be_a_positive_int(args, value):
    with pytest.raises(ValueError, match=r"microbatch_size must be an int >= 1"):
        call(args, microbatch_size=value)


def test_splitting_train_mode_batchnorm_names_the_fix(args):
    model = ConvNet(channels=1, num_classes=3, image_size=8, width=4, depth=2, norm="batch")
    params = dict(model.named_parameters())
    start = {k: v.detach().clone() for k, v in params.items()}
    target = {k: v + 0.1 for k, v in start.items()}
    bn = dict(args, model=model, start=start, target=target)
    with pytest.raises(ValueError, match=r"split \(microbatch_size=2\), but the model's "
                                         r"BatchNorm layers.*eval mode.*instance norm.*"
                                         r"microbatch_size=None"):
        call(bn, microbatch_size=2)
    assert call(bn, microbatch_size=3).loss > 0  # minibatches of 3 rows: nothing is split
    model.eval()  # running statistics: the rows are independent
    assert call(bn, microbatch_size=2).loss > 0


def test_splitting_needs_an_augment_that_takes_rows(args):
    def two_arguments(x, step):
        return x

    with pytest.raises(TypeError, match=r"augment must accept the keyword rows="):
        call(args, augment=two_arguments, microbatch_size=2)
    assert call(args, augment=two_arguments, microbatch_size=3).loss > 0  # nothing split
    assert call(args, augment=lambda x, step, rows=None: x, microbatch_size=2).loss > 0


def test_augment_drawn_for_other_batch_sizes(args):
    augment = DSA().replayable([3, 2], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"drawn for 2 steps of minibatch sizes \[3, 2\].*"
                                         r"minibatches of \[3, 3\] rows"):
        call(args, augment=augment)
