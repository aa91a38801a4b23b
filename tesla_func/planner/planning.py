"""The plan: every planned method and T predicted, with what the iteration holds besides the call,
and, given the device memory, whether each fits and the limits (:func:`plan`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from tesla_func.matching import METHODS
from tesla_func.planner.config import PlanConfig
from tesla_func.planner.limits import Limits
from tesla_func.planner.predictor import (
    Predictor,
    held_bytes,
    teacher_peak_bytes,
    update_peak_bytes,
)

if TYPE_CHECKING:  # xarray and pandas cost 0.6 s at start-up: imported where used (plan)
    import xarray as xr


def plan(cfg: PlanConfig) -> xr.Dataset:
    """Predicted memory and FLOPs of every planned method and T, with fits and limits.

    Returns an ``xarray.Dataset`` (dims ``method``, ``steps``, ``item``; bytes and FLOPs as
    float64 with units in their attributes):

    - ``call_peak_bytes`` (method, steps): peak of the matching call above its inputs;
    - ``flops`` (method, steps): its floating-point operations (matmuls and convolutions; see
      :class:`tesla_func.memory.Cost`);
    - ``extrapolated`` (method, steps): whether that T was extended linearly from two short T;
    - ``held_bytes`` (item): what the iteration holds across the call (:func:`held_bytes`);
    - ``step_inputs_bytes`` (steps): index batches and DSA draws of the iteration;
    - ``update_peak_bytes``, ``teacher_peak_bytes`` (): the transients after / before the call;
    - ``total_peak_bytes`` (method, steps): held + step inputs + max(call, update, teacher);
    - with ``device_memory``: ``fits`` (method, steps), ``max_syn_steps`` (method; inf = any T),
      ``max_syn_steps_verified`` (method), ``max_batch_syn`` (method, at the largest T; 0 = none);
      ``max_keep_graphs`` (method, steps; NaN for a method that takes no keep_graphs, and where
      not even 0 fits), ``max_keep_graphs_verified``, and at that k
      ``keep_graphs_total_peak_bytes`` (the iteration peak) and ``keep_graphs_flops`` (the
      call's).

    Attributes: the config, the DSA family planned on every step, N, the batch, the model's
    parameter count, the device bytes, and provenance (versions, git revision).
    """
    from tesla_func.results import make_results  # where used: see the TYPE_CHECKING import

    p = Predictor(cfg)
    methods, steps = list(cfg.methods), sorted(set(cfg.syn_steps))
    held = held_bytes(cfg, p.model)
    update = update_peak_bytes(cfg)
    teacher = teacher_peak_bytes(cfg, p.model)
    inputs = [p.step_inputs_bytes(t) for t in steps]
    peak = np.zeros((len(methods), len(steps)))
    flops = np.zeros_like(peak)
    extrapolated = np.zeros(peak.shape, dtype=bool)
    for i, m in enumerate(methods):
        for j, t in enumerate(steps):
            cost, extrapolated[i, j] = p.call(m, t)
            peak[i, j], flops[i, j] = cost.peak_bytes, cost.flops
    transient = max(update, teacher)
    total = sum(held.values()) + np.asarray(inputs)[None, :] + np.maximum(peak, transient)
    byte_attrs = {"units": "bytes"}
    data: dict[str, Any] = {
        "call_peak_bytes": (("method", "steps"), peak, {
            **byte_attrs, "long_name": "peak of the matching call above its inputs (predicted)"}),
        "flops": (("method", "steps"), flops, {
            "units": "FLOP", "long_name": "floating-point operations of the matching call "
                                          "(matmul, convolution and attention kernels)"}),
        "extrapolated": (("method", "steps"), extrapolated, {
            "long_name": "extended linearly from two short T (exact: tests check it)"}),
        "held_bytes": (("item",), np.array(list(held.values()), dtype=np.float64), {
            **byte_attrs, "long_name": "held by the iteration across the call"}),
        "step_inputs_bytes": (("steps",), np.array(inputs, dtype=np.float64), {
            **byte_attrs, "long_name": "index batches and DSA draws of the iteration"}),
        "update_peak_bytes": ((), float(update), {
            **byte_attrs, "long_name": "SGD update after the call, above the held memory"}),
        "teacher_peak_bytes": ((), float(teacher), {
            **byte_attrs, "long_name": "SLA teacher forward before the call, above held"}),
        "total_peak_bytes": (("method", "steps"), total, {
            **byte_attrs, "long_name": "iteration peak: held + step inputs + max(call, update, "
                                       "teacher)"}),
    }
    device = cfg.device_bytes
    if device is not None:
        limits = Limits(p, (sum(held.values()), transient), device)
        data["fits"] = (("method", "steps"), total <= device, {"long_name": "fits the device"})
        if "syn_steps" in cfg.limits:
            max_steps = [limits.max_steps(m) for m in methods]
            data["max_syn_steps"] = (("method",), np.array([s for s, _ in max_steps], float), {
                "long_name": "largest T that fits the device (inf: any T, 0: none)"})
            data["max_syn_steps_verified"] = (("method",), np.array([v for _, v in max_steps]), {
                "long_name": "the T limit was checked by a direct prediction"})
        if "batch_syn" in cfg.limits:
            data["max_batch_syn"] = (("method",), np.array([limits.max_batch(m) for m in methods]),
                                     {"long_name": f"largest batch_syn that fits at T = "
                                                   f"{max(steps)} (0: none)"})
        if "keep_graphs" in cfg.limits:
            outside = np.broadcast_to(sum(held.values()) + np.asarray(inputs)[None, :], peak.shape)
            data.update(_keep_graphs_limits(limits, methods, steps, outside, transient))
    s = cfg.shape
    return make_results(
        data,
        coords={"method": methods, "steps": steps, "item": list(held)},
        config=cfg.to_dict(),
        seed=cfg.distill.seed,
        device="cpu",
        kind="predicted (fake tensors)",
        dsa_family=p.family(cfg.batch) or "none",
        num_images=cfg.num_images,
        batch_syn=cfg.batch,
        num_params=sum(t.numel() for t in p.model.parameters()),
        image_shape=[s.channels, s.image_size, s.image_size],
        num_classes=s.num_classes,
        device_bytes=-1 if device is None else device,
    )


def _keep_graphs_limits(limits: Limits, methods: list[str], steps: list[int],
                        outside: np.ndarray, transient: int) -> dict[str, Any]:
    """The largest keep_graphs per (method, T) and the iteration at it, as Dataset variables.
    ``outside`` (method, steps): the iteration peak less the call's (held + step inputs)."""
    found = {(m, t): limits.max_keep(m, t)
             for m in methods if METHODS[m].takes_keep_graphs for t in steps}
    shape = (len(methods), len(steps))
    keep, peak, flops = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    verified = np.zeros(shape, dtype=bool)
    for (m, t), lim in found.items():
        i, j = methods.index(m), steps.index(t)
        verified[i, j] = lim.verified
        if lim.keep is not None:  # NaN where not even k = 0 fits
            keep[i, j] = lim.keep
            peak[i, j] = outside[i, j] + max(lim.cost.peak_bytes, transient)
            flops[i, j] = lim.cost.flops
    return {
        "max_keep_graphs": (("method", "steps"), keep, {
            "long_name": "largest keep_graphs whose iteration fits the device (NaN: the method "
                         "takes none, or not even 0 fits; without microbatches 1 is the call of "
                         "0 and never reported)"}),
        "max_keep_graphs_verified": (("method", "steps"), verified, {
            "long_name": "checked by predicting the call at keep_graphs k and the next k"}),
        "keep_graphs_total_peak_bytes": (("method", "steps"), peak, {
            "units": "bytes", "long_name": "iteration peak at the largest keep_graphs"}),
        "keep_graphs_flops": (("method", "steps"), flops, {
            "units": "FLOP", "long_name": "FLOPs of the matching call at the largest keep_graphs"}),
    }
