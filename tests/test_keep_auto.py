"""keep_graphs="auto": the largest k whose call fits the room, read off the planner's line in k.

On CPU with budgets that force k = 0, a middle k and k = T: the gradient is the same (float64),
the chosen k is what the line says, and a distillation logs it. The line is measured on the run's
shapes (tesla_func/planner/auto.py): its bytes equal the fake-tensor prediction's.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from tesla_func import ConvNet, match_trajectory
from tesla_func.augment import DSA
from tesla_func.configargs import add_config_arguments, config_from_args
from tesla_func.data import DatasetShape
from tesla_func.distill import DistillConfig
from tesla_func.models import init_params
from tesla_func.planner import PlanConfig, Predictor
from tesla_func.planner.auto import _LINES, KeepChoice, RunShape, choose_keep_graphs
from tests.test_matching import assert_same_result

STEPS = 6


def _problem(dtype=torch.float64, steps=STEPS):
    """A small DSA matching problem: ConvNet depth 1 width 4 on 12 images of 1x8x8, batch 6."""
    gen = torch.Generator().manual_seed(0)
    model = ConvNet(channels=1, num_classes=3, image_size=8, width=4, depth=1).to(dtype)
    start = {k: v.to(dtype) for k, v in init_params(model, gen).items()}
    target = {k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=dtype)
              for k, v in start.items()}
    images = torch.randn(12, 1, 8, 8, generator=gen, dtype=dtype)
    batches = [torch.randperm(12, generator=gen)[:6] for _ in range(steps)]
    augment = DSA().replayable([6] * steps, gen, dtype=dtype)
    return {"model": model, "start": start, "target": target, "images": images,
            "labels": torch.arange(12) % 3, "beta": torch.tensor(0.05, dtype=dtype),
            "batches": batches, "augment": augment}


def _run_shape(args) -> RunShape:
    """The RunShape match_trajectory builds for ``args`` (hard labels, DSA, batch 6)."""
    n, c, side, _ = args["images"].shape
    return RunShape(distill=DistillConfig(label_strategy="hard", batch_syn=6),
                    shape=DatasetShape(c, side, 1, n), model=args["model"], num_images=n,
                    torch_dtype=args["images"].dtype)


@pytest.mark.parametrize("method", ["tesla", "exact"])
def test_budgets_force_zero_a_middle_k_and_every_graph_with_the_same_gradient(method):
    args = _problem()
    run = _run_shape(args)
    peaks = {k: choose_keep_graphs(run, method, STEPS, "cpu", memory_budget=10**12,
                                   transient=False) for k in (None,)}
    assert peaks[None].keep == STEPS  # plenty of memory: every graph
    # the line's peaks at k = 2 .. T, measured once for this shape (cached)
    predictor = _LINES.get(run, torch.device("cpu"))
    line = predictor.keep_line(method, STEPS)
    inputs = predictor.step_inputs_bytes(STEPS)
    zero = inputs + predictor.call(method, STEPS, keep=0)[0].peak_bytes
    budgets = {0: (zero + inputs + line.at(2).peak_bytes) // 2,  # between k = 0 and k = 2
               3: inputs + (line.at(3).peak_bytes + line.at(4).peak_bytes) // 2,
               STEPS: 10**12}
    assert zero < budgets[0] < inputs + line.at(2).peak_bytes  # the line grows with k
    reference = match_trajectory(**args, method=method, keep_graphs=0)
    for keep, budget in budgets.items():
        choice = choose_keep_graphs(run, method, STEPS, "cpu", memory_budget=budget,
                                    transient=False)
        assert choice.keep == keep, (budget, choice)
        assert choice.peak_bytes <= budget and choice.fits
        result = match_trajectory(**args, method=method, keep_graphs="auto", memory_budget=budget)
        assert_same_result(result, reference, f"{method} auto with {budget} B (k = {keep})")
    tiny = choose_keep_graphs(run, method, STEPS, "cpu", memory_budget=1, transient=False)
    assert tiny.keep == 0 and not tiny.fits  # nothing fits: constant memory anyway
    assert "not even k = 0 fits" in tiny.describe()


def test_the_measured_line_is_the_predicted_one():
    """The points of the line auto measures on real tensors equal the planner's fake-tensor
    prediction of the same call, byte for byte (CPU)."""
    args = _problem(torch.float32)
    measured = _LINES.get(_run_shape(args), torch.device("cpu"))
    planned = Predictor(PlanConfig(DistillConfig(dataset="digits", ipc=2, batch_syn=6),
                                   model="convnet", width=4, depth=1, methods=("exact",)))
    planned.model = measured.model  # the same skeleton (digits' 8x8 with 10 classes otherwise)
    planned.cfg = dataclasses.replace(measured.cfg, extrapolate_above=4)  # the same shapes
    for keep in (0, 2, 3):
        assert (measured.direct("exact", 4, keep=keep).peak_bytes
                == planned.direct("exact", 4, keep=keep).peak_bytes), keep


def test_the_line_is_measured_once_per_shape():
    args = _problem()
    run = _run_shape(args)
    choose_keep_graphs(run, "exact", STEPS, "cpu", transient=False)
    before = dict(_LINES.predictors)
    again = choose_keep_graphs(run, "exact", STEPS, "cpu", transient=False)
    assert _LINES.predictors == before and again.keep == STEPS
    assert again.source in ("MemAvailable", "SC_AVPHYS_PAGES") and again.free_bytes > 0
    assert again.room_bytes == int(0.8 * again.free_bytes)


def test_unrolled_and_fake_tensors_need_no_prediction():
    args = _problem()
    assert choose_keep_graphs(_run_shape(args), "unrolled", STEPS, "cpu") == KeepChoice(
        0, STEPS, "unrolled", 0, 0, None, "method")
    from tesla_func import predict_cost

    _, cost = predict_cost(match_trajectory, **args, method="exact", keep_graphs="auto")
    _, zero = predict_cost(match_trajectory, **args, method="exact")
    assert cost.peak_bytes == zero.peak_bytes  # a prediction plans auto at k = 0
    with pytest.raises(ValueError, match="plans the augmentation as DSA"):
        match_trajectory(**{**args, "augment": lambda x, step: x}, method="exact",
                         keep_graphs="auto")


def test_auto_is_the_distillation_default_and_its_flags_parse():
    assert DistillConfig().keep_graphs == "auto" and DistillConfig().memory_budget is None
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, DistillConfig)
    for given, keep in ((["--keep-graphs", "auto"], "auto"), (["--keep-graphs", "3"], 3),
                        ([], "auto")):
        cfg = config_from_args(parser.parse_args(given + ["--memory-budget", "8GB"]),
                               DistillConfig)
        assert cfg.keep_graphs == keep and cfg.memory_budget == "8GB"
    for bad, message in (({"keep_graphs": "most"}, "'auto' or an int >= 0"),
                         ({"keep_graphs": -1}, "'auto' or an int >= 0"),
                         ({"memory_budget": "lots"}, "memory_budget: cannot read 'lots'")):
        with pytest.raises(ValueError, match=message):
            DistillConfig(**bad)


def test_slow_measurements_give_way_to_predictions(monkeypatch):
    """Once a measured call takes longer a step than predicting one, the rest are predicted:
    the same bytes on CPU."""
    import tesla_func.planner.predictor as predictor_module

    run = _run_shape(_problem(torch.float32))
    monkeypatch.setattr(predictor_module, "PREDICT_ABOVE_S", float("inf"))
    measured = Predictor(run, measure_on="cpu")  # type: ignore[arg-type]
    bytes_measured = [measured.direct("exact", 4, keep=k).peak_bytes for k in (0, 2, 3)]
    assert not measured.predicting
    monkeypatch.setattr(predictor_module, "PREDICT_ABOVE_S", 0.0)
    switching = Predictor(run, measure_on="cpu")  # type: ignore[arg-type]
    switching.family(run.batch)  # the first measured call: slower than 0 s a step
    assert switching.predicting
    assert [switching.direct("exact", 4, keep=k).peak_bytes for k in (0, 2, 3)] == bytes_measured
