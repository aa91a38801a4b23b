"""TensorBoard: ``--tensorboard DIR`` writes what the runs already log, read back with
TensorBoard's own event reader; without TensorBoard installed the option says how to get it."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tesla_func import cli

pytest.importorskip("tensorboard")  # the dev extra installs it
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)


def _events(folder) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def _values(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def experts_and_log(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    assert cli.main(["experts", "--dataset", "digits", "--num-experts", "1", "--epochs", "2",
                     "--width", "8", "--no-dsa", "--out", str(tmp / "experts"), "--no-progress",
                     "--tensorboard", str(tmp / "tb-experts")]) == 0
    return tmp


def test_experts_log_loss_and_accuracy_per_epoch(experts_and_log):
    events = _events(experts_and_log / "tb-experts")
    accuracy = _values(events, "experts/expert_000/test_accuracy")
    assert [step for step, _ in accuracy] == [0, 1, 2]
    assert [step for step, _ in _values(events, "experts/expert_000/loss")] == [1, 2]
    from tesla_func.experts import load_experts

    (expert,) = load_experts(experts_and_log / "experts")
    assert [v for _, v in accuracy] == pytest.approx(expert.test_accuracy)


def test_a_short_distillation_logs_its_scalars_and_the_set(experts_and_log, capsys):
    tmp = experts_and_log
    run, board = tmp / "run", tmp / "tb-run"
    assert cli.main(["distill", "--experts-dir", str(tmp / "experts"), "--ipc", "1",
                     "--label-strategy", "learned", "--iterations", "3", "--syn-steps", "2",
                     "--match-epochs", "1", "--max-start-epoch", "1", "--eval-every", "2",
                     "--eval-epochs", "1", "--eval-models", "1", "--out", str(run),
                     "--no-progress", "--tensorboard", str(board)]) == 0
    events = _events(board)
    from tesla_func.results import load_results

    log = load_results(run / "log.nc")
    for tag, name in (("loss", "loss"), ("beta", "lr"), ("label_drift", "label_drift"),
                      ("skipped", "skipped"), ("labels_grad_norm", "labels_grad_norm")):
        logged = _values(events, f"distill/{tag}")
        assert [s for s, _ in logged] == [1, 2, 3], tag
        assert [v for _, v in logged] == pytest.approx(log[name].values.tolist(), rel=1e-6), tag
    assert [v for _, v in _values(events, "distill/skipped_updates")] == [0, 0, 0]
    for tag, name in (("test_accuracy", "eval_accuracy_mean"),
                      ("val_accuracy", "eval_val_accuracy_mean")):
        logged = _values(events, f"eval/{tag}")
        assert [s for s, _ in logged] == [2, 3]
        assert [v for _, v in logged] == pytest.approx(log[name].values.tolist())
    (image,) = events.Images("distill/synthetic_set")  # the final set (no snapshots asked)
    assert image.step == 3 and image.height == 10 * 9 - 1 and image.width == 8  # 10 rows of 8px

    # with snapshots, the grid of every snapshot
    board2 = tmp / "tb-snap"
    assert cli.main(["distill", "--experts-dir", str(tmp / "experts"), "--ipc", "2",
                     "--iterations", "2", "--syn-steps", "2", "--match-epochs", "1",
                     "--max-start-epoch", "1", "--eval-epochs", "1", "--eval-models", "1",
                     "--snapshot-every", "1", "--out", str(tmp / "run2"), "--no-progress",
                     "--tensorboard", str(board2)]) == 0
    images = _events(board2).Images("distill/synthetic_set")
    assert [i.step for i in images] == [0, 1, 2] and images[0].width == 2 * 9 - 1
    assert "labels_grad_norm" not in str(_events(board2).Tags()["scalars"])  # NaN: left out

    # evaluate logs its accuracies at step = epochs
    assert cli.main(["evaluate", "--synthetic", str(run / "synthetic.safetensors"), "--epochs",
                     "2", "--num-models", "2", "--width", "8", "--no-progress",
                     "--tensorboard", str(tmp / "tb-eval")]) == 0
    accuracy = _values(_events(tmp / "tb-eval"), "evaluate/test_accuracy")
    assert len(accuracy) == 1 and accuracy[0][0] == 2 and 0 <= accuracy[0][1] <= 1
    assert "test accuracy:" in capsys.readouterr().out


def test_without_tensorboard_the_option_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    from tesla_func.tracking import TensorBoardLogger

    with pytest.raises(ImportError, match=r"pip install 'tesla_func\[tensorboard\]'"):
        TensorBoardLogger(tmp_path / "tb")
    assert cli.main(["evaluate", "--random-real", "1", "--dataset", "digits", "--epochs", "1",
                     "--num-models", "1", "--no-progress", "--tensorboard",
                     str(tmp_path / "tb")]) == 1
    err = capsys.readouterr().err
    assert "tesla-func evaluate: error: --tensorboard needs TensorBoard" in err
    assert "pip install 'tesla_func[tensorboard]'" in err
    # the library and the other commands do not import it
    assert cli.main(["evaluate", "--random-real", "1", "--dataset", "digits", "--epochs", "1",
                     "--num-models", "1", "--width", "4", "--no-progress"]) == 0


def test_experiments_log_what_they_train(tmp_path, monkeypatch):
    """``--tensorboard`` of an experiment: the experts and runs it trains through
    tesla_func.experiment each get a folder."""
    from tesla_func import experiment
    from tesla_func.experts import ExpertConfig

    monkeypatch.setenv(experiment.CACHE_ENV, str(tmp_path / "cache"))
    cfg, args = experiment._parse(ExpertConfig, {}, "", ["--tensorboard", str(tmp_path / "tb"),
                                                         "--num-experts", "1"])
    assert args.tensorboard == str(tmp_path / "tb") and cfg.num_experts == 1
    token = experiment._TENSORBOARD.set(tmp_path / "tb")
    try:
        cfg = ExpertConfig(dataset="digits", num_experts=1, epochs=1, width=4, dsa=False)
        folder = experiment.ensure_experts(cfg, progress=False)
    finally:
        experiment._TENSORBOARD.reset(token)
    events = _events(tmp_path / "tb" / "experts" / folder.name)
    assert len(events.Scalars("experts/expert_000/test_accuracy")) == 2
    assert experiment._TENSORBOARD.get() is None


def test_the_set_grid_is_one_row_per_class(tmp_path):
    import torch

    from tesla_func.data import load_dataset
    from tesla_func.plots import set_grid
    from tesla_func.synthetic import SyntheticSet

    data = load_dataset("digits")
    images = data.train_images[:30]
    synthetic = SyntheticSet(images, torch.arange(10).repeat_interleave(3), 0.01, None,
                             {"dataset_info": data.info.to_dict()})
    grid = set_grid(synthetic, dataset=data, pad=1)
    assert grid.shape == (1, 10 * 9 - 1, 3 * 9 - 1) and grid.dtype == np.float32
    assert grid.min() >= 0 and grid.max() <= 1 and (grid[:, 8, :] == 1).all()  # white gaps
    pixels = data.to_pixels(images[4:5]).clamp(0, 1)[0, 0].numpy()  # class 1, its second image
    assert np.allclose(grid[0, 9:17, 9:17], pixels, atol=1e-6)
