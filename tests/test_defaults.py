"""Per-dataset defaults: the rules of the image size, their resolution into the configs (explicit
values win, the choice is recorded), and a first run with only the required flags that works."""

from __future__ import annotations

import pytest
import torch

from tesla_func import cli
from tesla_func.data import (
    DATASETS,
    DatasetInfo,
    depth_for,
    expert_steps,
    run_defaults,
    shape,
)
from tesla_func.distill import DistillConfig
from tesla_func.experts import ExpertConfig, load_experts
from tesla_func.models import ConvNetConfig
from tesla_func.results import load_results
from tesla_func.synthetic import load_synthetic


def _info(name: str, channels: int, side: int) -> DatasetInfo:
    return DatasetInfo(name=name, num_classes=10, channels=channels, image_size=side,
                       class_names=tuple("abcdefghij"), mean=(0.0,) * channels,
                       std=(1.0,) * channels, zca=False, zca_eps=None, source="test")


@pytest.mark.parametrize("side, depth", [(2, 1), (4, 1), (8, 2), (12, 2), (16, 3), (28, 3),
                                         (32, 3), (64, 4), (128, 5)])
def test_depth_follows_the_image_size(side, depth):
    assert depth_for(side)[0] == depth


def test_the_last_norm_sees_at_least_4x4_values_and_the_network_fits():
    for side in range(2, 300):
        depth, why = depth_for(side)
        ConvNetConfig(channels=1, image_size=side, depth=depth)  # raises if it does not fit
        assert side < 4 or side // 2 ** (depth - 1) >= 4, (side, depth)
    assert depth_for(8)[1].startswith("8x8 images: the last block's norm sees 4x4 values")


@pytest.mark.parametrize("name, lr_img", [("digits", 64.0), ("fashion-mnist", 780.0),
                                          ("imagenet64", 12000.0), ("cifar10", 1000.0)])
def test_the_image_lr_is_one_per_pixel_but_for_zca_cifar(name, lr_img):
    s = shape(name)
    run, chosen = DistillConfig().resolved(_info(name, s.channels, s.image_size),
                                           train_size=s.train_size, expert_lr=0.01,
                                           expert_epochs=50, expert_batch_size=256)
    assert run.lr_img == lr_img
    assert ("one per pixel" in chosen["lr_img"]) == (name != "cifar10"), chosen["lr_img"]


def test_a_folder_takes_the_defaults_of_the_closest_dataset():
    for (channels, side), like in {(1, 8): "digits", (1, 28): "fashion-mnist",
                                   (3, 32): "cifar10", (3, 64): "imagenet64"}.items():
        defaults, why = run_defaults("folder", channels, side)
        assert defaults == run_defaults(like, channels, side)[0], (channels, side)
        assert repr(like) in why
    assert run_defaults("made-in-memory", 1, 8)[0] == run_defaults("digits", 1, 8)[0]


def test_every_dataset_resolves_to_configs_that_run():
    for name in DATASETS:
        s = shape(name) if name != "folder" else shape("cifar10")
        info = _info(name, s.channels, s.image_size)
        experts, chosen = ExpertConfig(dataset=name).resolved(info)
        assert None not in (experts.num_experts, experts.epochs, experts.width, experts.depth,
                            experts.lr)
        assert set(chosen) == {"num_experts", "epochs", "width", "depth", "lr"}
        info.convnet_config(width=experts.width, depth=experts.depth)  # it fits the images
        run, chosen = DistillConfig().resolved(
            info, train_size=s.train_size, expert_lr=experts.lr, expert_epochs=experts.epochs,
            expert_batch_size=experts.batch_size)
        assert run.syn_steps <= expert_steps(run.match_epochs, s.train_size, experts.batch_size)
        assert run.max_start_epoch - 1 + run.match_epochs <= experts.epochs
        assert run.lr_init == experts.lr and run.lr_grad_clip == 0.5 and run.method == "exact"
        assert set(chosen) - {"batch_syn"} == {"iterations", "syn_steps", "max_start_epoch",
                                               "lr_img", "lr_init"}


def test_explicit_values_win_and_are_not_recorded():
    info = _info("digits", 1, 8)
    cfg, chosen = ExpertConfig(dataset="digits", depth=3, lr=0.1).resolved(info)
    assert cfg.depth == 3 and cfg.lr == 0.1 and cfg.width == 32
    assert "depth" not in chosen and "lr" not in chosen and chosen["width"].startswith("32: ")
    run, chosen = DistillConfig(syn_steps=20, lr_img=5.0).resolved(
        info, train_size=1238, expert_lr=0.1, expert_epochs=10, expert_batch_size=256)
    assert run.syn_steps == 20 and run.lr_img == 5.0 and run.lr_init == 0.1
    assert "syn_steps" not in chosen and chosen["lr_init"] == "0.1: the experts' lr"


def test_fashion_mnist_students_step_on_minibatches_of_20_at_most():
    info, s = _info("fashion-mnist", 1, 28), shape("fashion-mnist")
    for ipc, batch in ((1, 10), (10, 20), (50, 20)):
        run, chosen = DistillConfig(ipc=ipc).resolved(
            info, train_size=s.train_size, expert_lr=0.01, expert_epochs=6, expert_batch_size=256)
        assert run.batch_syn == batch and run.syn_steps == 60 and "batch_syn" in chosen
    run, chosen = DistillConfig(ipc=10, batch_syn=100).resolved(
        info, train_size=s.train_size, expert_lr=0.01, expert_epochs=6, expert_batch_size=256)
    assert run.batch_syn == 100 and "batch_syn" not in chosen
    digits, _ = DistillConfig(ipc=10).resolved(_info("digits", 1, 8), train_size=1238,
                                               expert_lr=0.01, expert_epochs=10,
                                               expert_batch_size=256)
    assert digits.batch_syn is None  # the whole set


def test_the_student_takes_no_more_steps_than_the_expert_did():
    """digits: ceil(1238 / 256) = 5 steps an epoch, so match_epochs 2 spans 10 (the issue's
    default of 20 overshot: loss 9.25 at the first iteration)."""
    info = _info("digits", 1, 8)
    run, chosen = DistillConfig().resolved(info, train_size=1238, expert_lr=0.01,
                                           expert_epochs=10, expert_batch_size=256)
    assert run.syn_steps == 10 and "ceil(1238 / 256)" in chosen["syn_steps"]
    run, _ = DistillConfig(match_epochs=3).resolved(info, train_size=1238, expert_lr=0.01,
                                                    expert_epochs=3, expert_batch_size=256)
    assert run.syn_steps == 15 and run.max_start_epoch == 1


def test_the_files_record_what_was_chosen_and_why(tmp_path):
    assert cli.main(["experts", "--dataset", "digits", "--num-experts", "1", "--epochs", "3",
                     "--out", str(tmp_path / "e"), "--no-progress"]) == 0
    (expert,) = load_experts(tmp_path / "e")
    assert expert.config.depth == 2 and expert.config.width == 32 and expert.lr == 0.01
    assert expert.header["defaults"]["depth"].startswith("2: 8x8 images")
    assert "epochs" not in expert.header["defaults"]  # given
    assert cli.main(["distill", "--experts-dir", str(tmp_path / "e"), "--iterations", "1",
                     "--eval-epochs", "1", "--eval-models", "1", "--out", str(tmp_path / "r"),
                     "--no-progress"]) == 0
    header = load_synthetic(tmp_path / "r" / "synthetic.safetensors").header
    assert header["config"]["syn_steps"] == 10 and header["config"]["lr_img"] == 64.0
    assert header["config"]["max_start_epoch"] == 2  # 3 epochs less match_epochs 2, plus 1
    assert set(header["defaults"]) == {"syn_steps", "max_start_epoch", "lr_img", "lr_init"}
    log = load_results(tmp_path / "r" / "log.nc")
    assert log.attrs["defaults"] == header["defaults"]


@pytest.mark.slow
def test_digits_with_only_the_required_flags_beats_random_real(tmp_path, capsys):
    """The pipeline a new user runs, with the defaults a user gets: the distilled IPC 1 set beats
    random real images of the same size in the same evaluation protocol (5 networks each; the
    measured margin is about 15 points: 89-91% against 73%)."""
    torch.set_num_threads(1)
    experts, run = tmp_path / "experts", tmp_path / "run"
    assert cli.main(["experts", "--dataset", "digits", "--out", str(experts)]) == 0
    assert cli.main(["distill", "--experts-dir", str(experts), "--out", str(run)]) == 0
    distilled, real = tmp_path / "distilled.nc", tmp_path / "real.nc"
    assert cli.main(["evaluate", "--synthetic", str(run / "synthetic.safetensors"),
                     "--out", str(distilled)]) == 0
    assert cli.main(["evaluate", "--random-real", "1", "--dataset", "digits",
                     "--out", str(real)]) == 0
    distilled, real = load_results(distilled), load_results(real)
    assert distilled.sizes["model"] >= 3 and real.sizes["model"] == distilled.sizes["model"]
    assert distilled.attrs["config"]["arch_kwargs"] == {"width": 32, "depth": 2,
                                                        "norm": "instance"}
    assert real.attrs["config"]["arch_kwargs"] == {"width": 32, "depth": 2}
    assert float(distilled.accuracy.mean()) > float(real.accuracy.mean()) + 0.05, (
        float(distilled.accuracy.mean()), float(real.accuracy.mean()))
    header = load_synthetic(run / "synthetic.safetensors").header
    assert header["warnings"] == [] and header["stopped"] is None and header["skipped_updates"] == 0
