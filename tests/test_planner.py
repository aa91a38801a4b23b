"""The planner: the distillation's memory and FLOPs predicted at any size, without data or a GPU.

Its numbers are the library's own code run on fake tensors (tesla_func.memory.predict_cost), so
here they are checked against real runs at small sizes, the linear extensions in T and in
keep_graphs against direct prediction, and the limits against the predictions on either side of
them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from tesla_func import cli, match_trajectory, measure_peak_memory, predict_cost
from tesla_func.configargs import config_from_args
from tesla_func.augment import DSA, ReplayedDSA
from tesla_func.data import DATASETS, load_dataset, locate, shape
from tesla_func.models import build_model, init_params
from tesla_func.distill import DistillConfig
from tesla_func.memory import format_bytes, predict_peak_memory
from tesla_func.planner import (
    ANY,
    PLANNED_FIELDS,
    SWEPT_FIELDS,
    UNPLANNED_FIELDS,
    LabelKind,
    Limits,
    PlanConfig,
    Predictor,
    held_bytes,
    label_kind,
    plan,
    plan_markdown,
    plan_records,
    teacher_peak_bytes,
    update_peak_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
# A small plan: digits (1x8x8, 10 classes), ConvNet depth 1 width 4, 20 images, batch 8
SMALL = {"dataset": "digits", "model": "convnet", "width": 4, "depth": 1, "ipc": 2,
         "batch_syn": 8, "syn_steps": (2,), "dsa": False}


# ----------------------------------------------------------------------------------------------
# Inputs: shapes, sizes, configs


def test_every_dataset_has_a_shape_that_agrees_with_its_summary():
    from tesla_func.data.registry import spec as _spec

    for name in DATASETS:
        if _spec(name).shape is None:  # a folder of one's own: known once read
            with pytest.raises(KeyError, match="no fixed shape"):
                shape(name)
            continue
        s = shape(name)
        summary = locate(name).summary
        held_out = _spec(name).val_per_class * s.num_classes
        assert f"{s.train_size - held_out} train + {held_out} validation" in summary, name
        assert f"{s.image_size}x{s.image_size}x{s.channels}" in summary, name
        assert f"{s.num_classes} classes" in summary, name
    with pytest.raises(KeyError, match="known: fashion-mnist"):
        shape("mnist")


def test_digits_shape_matches_the_loaded_set():
    pytest.importorskip("sklearn")
    data, s = load_dataset("digits"), shape("digits")
    assert tuple(data.train_images.shape[1:]) == (s.channels, s.image_size, s.image_size)
    training_files = len(data.train_images) + len(data.val_images)
    assert (training_files, data.info.num_classes) == (s.train_size, s.num_classes)


@pytest.mark.parametrize(("change", "message"), [
    ({"dataset": "mnist"}, r"dataset 'mnist' is unknown; known: \['cifar10', .*'digits'"),
    ({"model": "resnet50"}, "unknown model 'resnet50'; known: convnet, convnetd4"),
    ({"model": "convnetd4", "width": None, "depth": None}, "too small for depth 4"),
    ({"model": "resnet18", "width": None, "depth": None}, "too small for instance norm"),
    ({"model": "vit", "width": 8}, "does not accept"),
    ({"batch_syn": 21}, r"larger than the synthetic set: ipc 2 x 10 classes = 20 images"),
    ({"methods": ("tesla", "adjoint")}, "known: \\['exact', 'tesla', 'unrolled'\\]"),
    ({"label_strategy": "soft"}, "label_strategy 'soft' is unknown; known: \\['hard', 'learned'"),
    ({"dtype": "float8"}, "unknown dtype"),
    ({"device_memory": "lots"}, "cannot read 'lots' as a memory size"),
    ({"syn_steps": (0,)}, "syn_steps must be T values >= 1"),
    ({"ipc": 0}, "DistillConfig.ipc must be a positive int"),
    ({"keep_graphs": -1}, "DistillConfig.keep_graphs must be .auto. or an int >= 0"),
    ({"microbatch_size": 0}, "DistillConfig.microbatch_size must be None or a positive int"),
    ({"dataset": None}, "the plan needs a dataset"),
])
def test_bad_configs_say_what_is_wrong(change, message):
    with pytest.raises(ValueError, match=message):
        PlanConfig(**{**SMALL, **change})


def test_a_plan_is_built_from_a_distill_config():
    """The run's planned fields as keywords set them in ``distill``; to_dict is flat and builds
    the same plan again; the swept fields are the plan's own."""
    run = DistillConfig(dataset="digits", ipc=2, batch_syn=8, dsa=False, keep_graphs=3,
                        microbatch_size=4, lr_img=5.0)
    cfg = PlanConfig(run, model="convnet", width=4, depth=1, syn_steps=(2,))
    assert cfg.distill is run and cfg == PlanConfig(dataset="digits", ipc=2, batch_syn=8,
                                                    dsa=False, keep_graphs=3, microbatch_size=4,
                                                    model="convnet", width=4, depth=1,
                                                    syn_steps=(2,), distill=run)
    flat = cfg.to_dict()
    assert flat["keep_graphs"] == 3 and flat["microbatch_size"] == 4 and flat["syn_steps"] == (2,)
    assert "lr_img" not in flat and "method" not in flat and "distill" not in flat
    assert PlanConfig(**flat).to_dict() == flat
    assert PlanConfig(**SMALL).distill.ipc == 2 and PlanConfig().distill.dataset == "cifar10"
    with pytest.raises(TypeError, match=r"unknown keywords \['method'\]"):
        PlanConfig(**SMALL, method="exact")  # swept: methods=("exact",)


def test_every_distill_field_is_sorted_into_planned_or_not():
    """A field added to DistillConfig must be sorted: planned (it changes memory, or the DSA
    draws) or not; the swept ones are planned and have a PlanConfig field of their own."""
    fields = [f.name for f in dataclasses.fields(DistillConfig)]
    assert sorted(PLANNED_FIELDS + UNPLANNED_FIELDS) == sorted(fields)
    assert not set(PLANNED_FIELDS) & set(UNPLANNED_FIELDS)
    plan_fields = {f.name for f in dataclasses.fields(PlanConfig)}
    assert set(SWEPT_FIELDS) <= set(PLANNED_FIELDS) and set(SWEPT_FIELDS.values()) <= plan_fields


def test_label_kinds_come_from_the_strategies():
    assert label_kind("hard") == LabelKind(soft=False, learned=False, teacher=False)
    assert label_kind("learned") == LabelKind(soft=True, learned=True, teacher=False)
    assert label_kind("sla-only") == LabelKind(soft=True, learned=False, teacher=True,
                                               images=False)


def test_keep_graphs_is_passed_only_when_set_and_only_to_tesla_and_exact():
    p = Predictor(PlanConfig(**SMALL))
    assert p.method_kwargs("tesla") == {"method": "tesla"}
    p = Predictor(PlanConfig(**SMALL, keep_graphs=2, state_stride=3))
    assert p.method_kwargs("tesla") == {"method": "tesla", "keep_graphs": 2}
    assert p.method_kwargs("exact") == {"method": "exact", "state_stride": 3, "keep_graphs": 2}
    assert p.method_kwargs("unrolled") == {"method": "unrolled"}
    assert p.anchors("exact", 50)[0] >= 3 + 3 + 2  # past the first segment and the kept graphs


# ----------------------------------------------------------------------------------------------
# The predictions against real runs


def _real_arguments(cfg: PlanConfig, steps: int, family: str | None, seed: int = 0):
    """Real tensors of the shapes the planner plans (the same DSA family on every step)."""
    gen = torch.Generator().manual_seed(seed)
    s, n, batch = cfg.shape, cfg.num_images, cfg.batch
    model = build_model(cfg.model, s.channels, s.num_classes, s.image_size,
                        width=cfg.width, depth=cfg.depth)
    start = init_params(model, gen)
    target = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    labels = (torch.randn(n, s.num_classes, generator=gen)
              if label_kind(cfg.distill.label_strategy).soft
              else torch.randint(0, s.num_classes, (n,), generator=gen))
    augment = None
    if family is not None:
        draws = tuple(DSA().sample(batch, gen, family=family) for _ in range(steps))
        augment = ReplayedDSA(DSA(), draws)
    return {
        "model": model, "start": start, "target": target,
        "images": torch.randn(n, s.channels, s.image_size, s.image_size, generator=gen),
        "labels": labels, "beta": torch.tensor(0.01),
        "batches": [torch.randperm(n, generator=gen)[:batch] for _ in range(steps)],
        "augment": augment,
    }


@pytest.mark.parametrize(("labels", "dsa"), [("learned", True), ("hard", False)])
def test_planned_call_equals_a_real_measurement(labels, dsa):
    cfg = PlanConfig(**{**SMALL, "label_strategy": labels, "dsa": dsa, "syn_steps": (3,)})
    ds = plan(cfg)
    family = None if ds.attrs["dsa_family"] == "none" else ds.attrs["dsa_family"]
    args = _real_arguments(cfg, 3, family)
    for method in cfg.methods:
        _, measured = measure_peak_memory(match_trajectory, **args, method=method)
        at = ds.sel({"method": method, "steps": 3})
        assert int(at["call_peak_bytes"]) == measured.peak_bytes, method
        _, cost = predict_cost(match_trajectory, **args, method=method)
        assert int(at["flops"]) == cost.flops, method


@pytest.mark.parametrize(("labels", "dsa"), [("learned", True), ("hard", False)])
def test_microbatches_are_planned(labels, dsa):
    """The run's microbatch_size goes into the predicted call: the plan equals
    predict_peak_memory (and the measurement) of the same call, and tesla and exact peak lower
    than without microbatches."""
    cfg = PlanConfig(**{**SMALL, "label_strategy": labels, "dsa": dsa, "syn_steps": (3,),
                        "microbatch_size": 3})
    split = plan(cfg)
    whole = plan(PlanConfig(dataclasses.replace(cfg.distill, microbatch_size=None),
                            **{k: v for k, v in SMALL.items() if k in ("model", "width", "depth")},
                            syn_steps=(3,)))
    family = None if split.attrs["dsa_family"] == "none" else split.attrs["dsa_family"]
    args = _real_arguments(cfg, 3, family)
    for method in cfg.methods:
        at = split.sel({"method": method, "steps": 3})
        _, predicted = predict_peak_memory(match_trajectory, **args, method=method,
                                           microbatch_size=3)
        _, measured = measure_peak_memory(match_trajectory, **args, method=method,
                                          microbatch_size=3)
        assert int(at["call_peak_bytes"]) == predicted.peak_bytes == measured.peak_bytes, method
        if method != "unrolled":  # it keeps every chunk of every step
            assert at["call_peak_bytes"] < whole.sel({"method": method, "steps": 3})[
                "call_peak_bytes"], method


@pytest.mark.parametrize(("method", "stride", "keep"), [
    ("unrolled", 1, 0), ("tesla", 1, 0), ("exact", 1, 0), ("exact", 2, 0), ("tesla", 1, 3),
    ("exact", 1, 2),
])
def test_linear_extension_in_steps_holds_with_microbatches(method, stride, keep):
    cfg = PlanConfig(**{**SMALL, "microbatch_size": 3, "state_stride": stride,
                        "keep_graphs": keep, "extrapolate_above": 0})
    p = Predictor(cfg)
    extended, extrapolated = p.call(method, 11)
    assert extrapolated and max(p.anchors(method, 11)) < 11
    direct = p.direct(method, 11)
    assert (extended.peak_bytes, extended.flops) == (direct.peak_bytes, direct.flops)


@pytest.mark.parametrize(("method", "stride", "labels", "dsa", "steps", "keep"), [
    ("unrolled", 1, "hard", True, 7, 0),
    ("tesla", 1, "learned", False, 7, 0),
    ("exact", 1, "sla", False, 7, 0),
    ("exact", 2, "hard", False, 10, 0),
    ("exact", 3, "hard", False, 13, 0),
    ("tesla", 1, "hard", True, 9, 3),
    ("exact", 1, "learned", False, 9, 2),
    ("exact", 2, "sla", False, 13, 3),
    ("unrolled", 1, "hard", False, 7, 4),  # unrolled ignores keep_graphs: not in its anchors
])
def test_linear_extension_in_steps_equals_direct_prediction(method, stride, labels, dsa, steps,
                                                            keep):
    cfg = PlanConfig(**{**SMALL, "label_strategy": labels, "dsa": dsa, "state_stride": stride,
                        "extrapolate_above": 0, "keep_graphs": keep})
    p = Predictor(cfg)
    extended, extrapolated = p.call(method, steps)
    assert extrapolated and max(p.anchors(method, steps)) < steps
    direct = p.direct(method, steps)
    assert extended.peak_bytes == direct.peak_bytes
    assert extended.flops == direct.flops and extended.flops_by_op == direct.flops_by_op


def test_update_peak_is_what_the_distillers_sgd_step_holds():
    from tesla_func.optim import SGDState, sgd

    params = {"images": torch.randn(20, 1, 8, 8), "label_logits": torch.randn(20, 10)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    momenta = SGDState({k: torch.randn_like(v) for k, v in params.items()})
    _, peak = measure_peak_memory(sgd(0.5).update, params, grads, momenta, 1.0)
    images, logits = 20 * 1 * 8 * 8 * 4, 20 * 10 * 4
    assert peak.peak_bytes == 2 * (images + logits)  # the new momenta and the new values
    cfg = PlanConfig(**{**SMALL, "label_strategy": "learned"})
    assert update_peak_bytes(cfg) == images + logits + 2 * (images + logits)


def test_teacher_peak_is_a_real_teacher_forward_above_its_output():
    cfg = PlanConfig(**{**SMALL, "label_strategy": "sla"})
    args = _real_arguments(cfg, 1, None)
    model = args["model"].eval()

    def teacher(params, images):
        with torch.no_grad():
            return functional_call(model, params, (images,), strict=True)

    _, measured = measure_peak_memory(teacher, args["target"], args["images"])
    assert teacher_peak_bytes(cfg) == measured.peak_bytes - 20 * 10 * 4
    assert teacher_peak_bytes(PlanConfig(**SMALL)) == 0  # hard labels: no teacher


def test_iteration_peak_adds_up():
    cfg = PlanConfig(**{**SMALL, "label_strategy": "learned", "syn_steps": (1, 2)})
    ds = plan(cfg)
    held = held_bytes(cfg)
    params = sum(p.numel() for p in cfg.skeleton().parameters()) * 4
    assert held["synthetic images"] == held["image momentum"] == 20 * 64 * 4
    assert held["labels"] == held["label momentum"] == 20 * 10 * 4
    assert held["expert start and target"] == 2 * params
    assert int(ds["step_inputs_bytes"].sel(steps=2)) == 2 * 8 * 8  # int64 indices, no DSA
    transient = max(int(ds["update_peak_bytes"]), int(ds["teacher_peak_bytes"]))
    for method in cfg.methods:
        for t in (1, 2):
            at = ds.sel({"method": method, "steps": t})
            expected = (sum(held.values()) + int(ds["step_inputs_bytes"].sel(steps=t))
                        + max(int(at["call_peak_bytes"]), transient))
            assert int(at["total_peak_bytes"]) == expected
    assert not ds["extrapolated"].any()


# ----------------------------------------------------------------------------------------------
# Limits


def test_limits_are_the_largest_that_fit():
    cfg = PlanConfig(**{**SMALL, "syn_steps": (4,)})
    p = Predictor(cfg)
    held = sum(held_bytes(cfg).values())
    transient = max(update_peak_bytes(cfg), teacher_peak_bytes(cfg))

    def total(method, steps, batch=None):
        call = p.direct(method, steps, batch).peak_bytes
        return held + p.step_inputs_bytes(steps, batch) + max(call, transient)

    device = (total("unrolled", 6) + total("unrolled", 7)) // 2  # unrolled fits up to T = 6
    ds = plan(PlanConfig(**{**SMALL, "syn_steps": (4,), "device_memory": str(device),
                            "verify_max_steps": 10, "limits": ("syn_steps", "batch_syn")}))
    limits = {r["method"]: r for r in plan_records(ds)["limits"]}
    assert limits["unrolled"]["max_syn_steps"] == 6 and limits["unrolled"]["max_syn_steps_verified"]
    assert limits["tesla"]["max_syn_steps"] == "any"
    assert float(ds["max_syn_steps"].sel({"method": "tesla"})) == ANY == float("inf")
    exact = limits["exact"]["max_syn_steps"]
    assert exact > 6 and not limits["exact"]["max_syn_steps_verified"]  # far beyond a check
    assert bool(ds["fits"].sel({"method": "unrolled", "steps": 4}))
    # the largest batch at T = 4: it fits and one more image does not (or it is the whole set)
    for method, lim in limits.items():
        b = lim["max_batch_syn"]
        assert total(method, 4, b) <= device
        assert b == 20 or total(method, 4, b + 1) > device
    text = plan_markdown(ds)
    assert "`unrolled` on" in text and "fits for T <= 6" in text and "any T" in text


def test_a_device_too_small_for_one_step():
    ds = plan(PlanConfig(**{**SMALL, "methods": ("unrolled",), "device_memory": "1KiB"}))
    lim = plan_records(ds)["limits"][0]
    assert lim["max_syn_steps"] == 0 and lim["max_batch_syn"] == 0
    assert not ds["fits"].any()
    assert "does not fit even at T = 1" in plan_markdown(ds)


# The keep_graphs limit: ConvNet depth 1 width 4 on digits, learned labels, T = 6. One Predictor per
# config (a cache of predictions), whatever the device.
KEEP = {**SMALL, "label_strategy": "learned"}
KEEP_STEPS = 6


@functools.cache
def _predictor(cfg: PlanConfig) -> Predictor:
    return Predictor(cfg)


def _keep_totals(cfg: PlanConfig, method: str, steps: int) -> list[int]:
    """The iteration peak at T = steps for keep_graphs 0 .. T, every call predicted directly."""
    p = _predictor(cfg)
    outside = sum(held_bytes(cfg).values()) + p.step_inputs_bytes(steps)
    transient = max(update_peak_bytes(cfg), teacher_peak_bytes(cfg))
    return [outside + max(p.direct(method, steps, keep=k).peak_bytes, transient)
            for k in range(steps + 1)]


def _keep_limit(cfg: PlanConfig, method: str, steps: int, device: int, verify=None):
    return Limits.of(_predictor(cfg), device).max_keep(method, steps, verify=verify)


def test_keep_graphs_one_is_the_call_of_zero():
    """Why the limit never reports k = 1: without microbatches the last step's graph is kept
    anyway, so keep_graphs 1 predicts the very call of keep_graphs 0."""
    p = _predictor(PlanConfig(**KEEP))
    for method in ("tesla", "exact"):
        one, zero = p.direct(method, KEEP_STEPS, keep=1), p.direct(method, KEEP_STEPS, keep=0)
        assert one == zero and one.flops_by_op == zero.flops_by_op, method


@pytest.mark.parametrize(("method", "change", "steps"), [
    ("tesla", {}, KEEP_STEPS),
    ("exact", {}, KEEP_STEPS),
    ("exact", {"state_stride": 2, "label_strategy": "sla"}, 9),
    ("tesla", {"microbatch_size": 3}, KEEP_STEPS),
    ("exact", {"microbatch_size": 3}, KEEP_STEPS),
])
def test_keep_line_equals_direct_prediction(method, change, steps):
    """The line in keep_graphs k from the call at k = 0 and three short calls: equal to the call
    predicted directly for 2 <= k < T (exact with s = 1: up to k = T; tesla at k = T holds one
    parameter vector less); with a stride s, exact along k = 2 (mod s) and within a parameter
    vector elsewhere. With microbatches it holds from k = 1 on."""
    cfg = PlanConfig(**{**KEEP, **change})
    p = _predictor(cfg)
    vector = sum(t.numel() for t in p.model.parameters()) * 4
    s = p.stride(method)
    assert steps > p.anchors(method, steps, keep=0)[1]  # past the short calls: the line is used
    line = p.keep_line(method, steps)
    assert p.first_keep == (1 if cfg.distill.microbatch_size else 2)
    for k in range(p.first_keep, steps + 1):
        direct, on_line = p.direct(method, steps, keep=k), line.at(k)
        if k == steps and method == "tesla":
            assert direct.peak_bytes == on_line.peak_bytes - vector, k
            assert direct.flops == on_line.flops, k
        elif (k - 2) % s == 0:
            assert (direct.peak_bytes, direct.flops) == (on_line.peak_bytes, on_line.flops), k
        else:
            assert abs(direct.peak_bytes - on_line.peak_bytes) <= vector, k


@pytest.mark.parametrize("method", ["tesla", "exact"])
def test_keep_graphs_limit_fits_and_one_more_does_not(method):
    cfg = PlanConfig(**KEEP)
    totals = _keep_totals(cfg, method, KEEP_STEPS)
    assert totals == sorted(totals), totals  # monotone in k
    for keep in (2, 3, 5):  # a device between the peaks at k and k + 1
        device = (totals[keep] + totals[keep + 1]) // 2
        lim = _keep_limit(cfg, method, KEEP_STEPS, device)
        assert lim.keep == keep and lim.verified
        assert totals[keep] <= device < totals[keep + 1]
        assert lim.cost == _predictor(cfg).direct(method, KEEP_STEPS, keep=keep)


@pytest.mark.parametrize("method", ["tesla", "exact"])
def test_keep_graphs_limit_at_the_ends(method):
    cfg = PlanConfig(**KEEP)
    totals = _keep_totals(cfg, method, KEEP_STEPS)
    assert totals[1] == totals[0] < totals[2]
    # the device barely fits k = 0 (k = 1 is the same call): k = 0
    assert _keep_limit(cfg, method, KEEP_STEPS, totals[0]).keep == 0
    # one byte less: not even k = 0
    assert _keep_limit(cfg, method, KEEP_STEPS, totals[0] - 1) == (None, True, None)
    # a huge device: every graph kept, k = T
    assert _keep_limit(cfg, method, KEEP_STEPS, 10**12).keep == KEEP_STEPS
    # exactly the peak at k = T, where tesla's line (one parameter vector above it) says T - 1
    assert _keep_limit(cfg, method, KEEP_STEPS, totals[-1]).keep == KEEP_STEPS


@pytest.mark.parametrize("method", ["tesla", "exact"])
def test_with_microbatches_keep_graphs_one_is_a_limit_of_its_own(method):
    """Split into microbatches, k = 0 keeps only the last chunk's graph and k = 1 the whole last
    step's: k = 1 is a call of its own, and the largest k that fits may be 1."""
    cfg = PlanConfig(**{**KEEP, "microbatch_size": 3})
    totals = _keep_totals(cfg, method, KEEP_STEPS)
    assert totals[0] < totals[1] < totals[2]
    for verify in (True, False):
        assert _keep_limit(cfg, method, KEEP_STEPS, totals[1], verify=verify).keep == 1
        assert _keep_limit(cfg, method, KEEP_STEPS, totals[1] - 1, verify=verify).keep == 0
    assert _keep_limit(cfg, method, KEEP_STEPS, totals[3]).keep == 3


@pytest.mark.parametrize("method", ["tesla", "exact"])
def test_keep_graphs_read_off_the_line_is_the_checked_limit(method):
    """Above verify_keep_max_steps k is read off the line, not checked: here the same k, peak and
    FLOPs as the checked search (but for k = T - 1 and T with tesla: its line holds one vector
    more at k = T, so the device at T's peak reads T - 1: checked in the test above)."""
    cfg = PlanConfig(**KEEP)
    totals = _keep_totals(cfg, method, KEEP_STEPS)
    for keep in (0, 2, 3, 4):
        device = (totals[keep] + totals[keep + 1 if keep else 2]) // 2
        checked = _keep_limit(cfg, method, KEEP_STEPS, device, verify=True)
        estimate = _keep_limit(cfg, method, KEEP_STEPS, device, verify=False)
        assert checked.verified and not estimate.verified
        assert estimate.keep == checked.keep == keep
        assert estimate.cost == checked.cost


def test_keep_graphs_limit_in_the_plan_per_planned_steps():
    cfg = PlanConfig(**{**KEEP, "syn_steps": (3, KEEP_STEPS), "methods": ("unrolled", "tesla")})
    totals = _keep_totals(PlanConfig(**KEEP), "tesla", KEEP_STEPS)
    device = (totals[4] + totals[5]) // 2  # tesla: its peak at k does not depend on T
    ds = plan(dataclasses.replace(cfg, device_memory=str(device), limits=("keep_graphs",)))
    rows = {(r["method"], r["steps"]): r for r in plan_records(ds)["rows"]}
    tesla = rows["tesla", KEEP_STEPS]
    assert tesla["max_keep_graphs"] == 4 and rows["tesla", 3]["max_keep_graphs"] == 3
    assert tesla["keep_graphs_total_peak_bytes"] == totals[4]
    assert tesla["max_keep_graphs_verified"] and "max_keep_graphs" not in rows["unrolled", 3]
    assert np.isnan(ds["max_keep_graphs"].sel({"method": "unrolled"})).all()
    text = plan_markdown(ds)
    assert "| largest keep_graphs |" in text
    assert (f"| 4 ({format_bytes(totals[4])}, {tesla['keep_graphs_flops'] / 1e9:.1f} GFLOPs) |"
            in text)


# ----------------------------------------------------------------------------------------------
# Scale: nothing of the planned size is allocated


def test_planning_more_than_50_gb_stays_under_2_gb_of_resident_memory():
    """A run that would need more than 50 GB, predicted in a fresh process; its peak resident
    memory (the kernel's high-water mark, VmHWM) stays under 2 GB."""
    script = textwrap.dedent("""
        import json, torch
        from pathlib import Path
        torch.set_num_threads(1)
        from tesla_func.planner import PlanConfig, Predictor
        cfg = PlanConfig(dataset="cifar100", model="convnet", width=128, ipc=50, batch_syn=5000,
                         syn_steps=(4,), methods=("unrolled",), dsa=False)
        cost = Predictor(cfg).direct("unrolled", 4)
        hwm = next(l for l in Path("/proc/self/status").read_text().splitlines()
                   if l.startswith("VmHWM:"))
        print(json.dumps({"peak_bytes": cost.peak_bytes, "hwm_bytes": int(hwm.split()[1]) * 1024}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["peak_bytes"] > 50e9, out
    assert out["hwm_bytes"] < 2e9, out


# ----------------------------------------------------------------------------------------------
# Transfer architectures and the command line


@pytest.mark.parametrize(("dataset", "model", "kw"), [
    ("cifar10", "resnet18", {"width": 2}),
    ("digits", "vit", {"depth": 1}),
    ("digits", "convnetd4", {"width": 2, "depth": 3}),
])
def test_transfer_architectures_plan(dataset, model, kw):
    cfg = PlanConfig(dataset=dataset, model=model, ipc=1, batch_syn=4, syn_steps=(1,),
                     methods=("tesla",), dsa=False, **kw)
    ds = plan(cfg)
    at = ds.sel({"method": "tesla", "steps": 1})
    assert int(at["call_peak_bytes"]) > 0 and int(at["flops"]) > 0


def test_plan_command_prints_markdown_and_json(capsys):
    argv = ["plan", "--dataset", "digits", "--model", "convnet", "--width", "4", "--depth", "1",
            "--ipc", "2", "--batch-syn", "8", "--syn-steps", "1", "2", "--no-dsa"]
    assert cli.main([*argv, "--device-memory", "1GiB", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["steps"]) for r in out["rows"]] == [
        (m, t) for m in ("unrolled", "tesla", "exact") for t in (1, 2)]
    assert out["device_bytes"] == 2**30 and all(r["fits"] for r in out["rows"])
    keeps = {(r["method"], r["steps"]): r.get("max_keep_graphs") for r in out["rows"]}
    assert keeps == {("unrolled", 1): None, ("unrolled", 2): None, ("tesla", 1): 0,
                     ("tesla", 2): 2, ("exact", 1): 0, ("exact", 2): 2}  # every graph fits
    assert out["held_bytes"]["synthetic images"] == 20 * 64 * 4
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "| method | T | matching call | iteration peak | GFLOPs (call) |" in text
    assert cli.main([*argv, "--device-memory", "1GiB", "--limits", "keep_graphs"]) == 0
    assert "| fits 1.00 GiB | largest keep_graphs |" in capsys.readouterr().out


# A value of each planned field as a command-line flag takes it (a planned field missing here
# fails the test below: it must be given a value and so be a `plan` flag).
FLAG_VALUES = {
    "dataset": ["digits"], "ipc": ["3"], "batch_syn": ["8"], "syn_steps": ["2", "3"],
    "method": ["tesla", "exact"], "label_strategy": ["sla"], "dsa": [], "state_stride": ["2"],
    "microbatch_size": ["4"], "keep_graphs": ["2"], "seed": ["7"],
}


@pytest.mark.parametrize("name", PLANNED_FIELDS)
def test_plan_takes_every_planned_distill_option_by_its_distill_flag(name):
    parser = cli.build_parser()
    flag = "--" + name.replace("_", "-") if name != "dsa" else "--no-dsa"
    values = FLAG_VALUES[name]
    base = ["--dataset", "digits", "--model", "convnet", "--width", "4", "--depth", "1"]
    cfg = config_from_args(parser.parse_args(["plan", *base, flag, *values]), PlanConfig)
    run = config_from_args(parser.parse_args(["distill", "--out", "x", flag, *values[:1]]),
                           DistillConfig)
    if name in SWEPT_FIELDS:  # several values in a plan, one in a run
        assert getattr(cfg, SWEPT_FIELDS[name]) == tuple(type(getattr(run, name))(v)
                                                         for v in values)
    else:
        assert getattr(cfg.distill, name) == getattr(run, name) != getattr(DistillConfig(), name)


def test_plan_refuses_the_options_it_does_not_plan(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["plan", "--lr-img", "3"])
    assert "unrecognized arguments: --lr-img" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["plan", "--methods", "exact", "--syn-steps", "5"])
    assert config_from_args(args, PlanConfig).methods == ("exact",)  # the older flag


def test_plan_command_reports_bad_input_without_a_traceback(capsys):
    assert cli.main(["plan", "--dataset", "digits", "--model", "convnetd4"]) == 1
    err = capsys.readouterr().err
    assert "tesla-func plan: error:" in err and "too small for depth 4" in err
    assert cli.main(["plan", "--dataset", "cifar-10"]) == 1
    assert "dataset 'cifar-10' is unknown; known: ['cifar10'" in capsys.readouterr().err
