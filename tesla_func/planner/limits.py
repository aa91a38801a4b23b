"""The largest T, batch and keep_graphs whose distillation iteration fits a device, per method,
found on the predictor's lines and checked by direct predictions on either side."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from tesla_func.memory import Cost, parse_bytes
from tesla_func.planner.predictor import (
    Predictor,
    held_bytes,
    teacher_peak_bytes,
    update_peak_bytes,
)

ANY = math.inf  # the largest T of a method whose matching call does not grow with T: any T


def _largest(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The largest x in [low, high] with fits(x) by bisection (fits is True up to the answer and
    False after it); low - 1 if none fits."""
    if not fits(low):
        return low - 1
    while low < high:  # invariant: fits(low)
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


class Limits:
    """Largest T, largest batch and largest keep_graphs that fit a device, per method.

    ``fixed`` = (bytes held across the call, the largest transient outside it: SGD update or SLA
    teacher); the iteration fits if held + step inputs + max(call, transient) <= device.
    """

    def __init__(self, predictor: Predictor, fixed: tuple[int, int], device: int) -> None:
        self.p, self.fixed, self.device = predictor, fixed, device

    @classmethod
    def of(cls, predictor: Predictor, device: int | str) -> Limits:
        """The limits of ``device`` bytes (or a size like "48GB") for the predictor's config."""
        cfg, model = predictor.cfg, predictor.model
        held = sum(held_bytes(cfg, model).values())
        transient = max(update_peak_bytes(cfg), teacher_peak_bytes(cfg, model))
        return cls(predictor, (held, transient), parse_bytes(device))

    def total(self, method: str, steps: int, batch: int, *, direct: bool) -> int:
        cost = (self.p.direct(method, steps, batch) if direct
                else self.p.call(method, steps, batch)[0])
        held, transient = self.fixed
        return held + self.p.step_inputs_bytes(steps, batch) + max(cost.peak_bytes, transient)

    def max_steps(self, method: str) -> tuple[int | float, bool]:
        """(largest T that fits, checked by a direct prediction?): :data:`ANY` (infinite) if the
        method's call does not grow with T, 0 if not even T = 1 fits. The T from the line through
        two short T is checked by predicting the call at that T (when it is at most
        ``verify_max_steps``)."""
        cfg, batch = self.p.cfg, self.p.cfg.batch
        a, b = self.p.anchors(method, max(cfg.syn_steps))
        ca, cb = self.p.direct(method, a, batch), self.p.direct(method, b, batch)
        if cb.peak_bytes == ca.peak_bytes:
            return ANY, False

        def fits(t: int) -> bool:
            return self.total(method, t, batch, direct=True) <= self.device

        if not fits(1):
            return 0, True
        held = self.fixed[0]
        per_step = (cb.peak_bytes - ca.peak_bytes) / (b - a) + self.p.step_inputs_bytes(1, batch)
        room = self.device - held - self.p.step_inputs_bytes(a, batch) - ca.peak_bytes
        estimate = max(a + math.floor(room / per_step), 1)
        if estimate > cfg.verify_max_steps:
            return estimate, False
        if fits(estimate):
            return estimate, True
        return _largest(fits, 1, estimate - 1), True  # not linear after all: search below

    def max_batch(self, method: str) -> int:
        """Largest batch_syn (at most N) whose call at the largest planned T fits; 0 if none.

        Estimated on the line through the planned batch and half of it, then checked: the
        estimate must fit and one more image must not (else a bisection over [1, N])."""
        cfg = self.p.cfg
        steps, n, b2 = max(cfg.syn_steps), cfg.num_images, cfg.batch

        def fits(b: int) -> bool:
            return self.total(method, steps, b, direct=False) <= self.device

        b1 = max(1, b2 // 2)
        if b1 < b2:
            t1 = self.total(method, steps, b1, direct=False)
            t2 = self.total(method, steps, b2, direct=False)
            slope = (t2 - t1) / (b2 - b1)
            estimate = n if slope <= 0 else b2 + math.floor((self.device - t2) / slope)
            estimate = min(max(estimate, 1), n)
            if fits(estimate) and (estimate == n or not fits(estimate + 1)):
                return estimate
        return max(_largest(fits, 1, n), 0)

    def max_keep(self, method: str, steps: int, *, verify: bool | None = None) -> KeepLimit:
        """The largest keep_graphs k in 0 .. T whose iteration at T fits (None if not even k = 0).

        Without microbatches k = 1 is the call of k = 0 (the last step's graph is kept in any
        case) and is never the answer (:attr:`Predictor.first_keep`). k is read off
        :meth:`Predictor.keep_line`; for T up to ``verify_keep_max_steps`` (or at most the line's
        short anchor) it is then checked by predicting the whole call at k (it fits) and at the
        next k (it does not; none after T), and searched by bisection if the check fails. Above,
        the line's k is the answer, marked as not verified. ``verify`` True or False overrides
        ``verify_keep_max_steps``.
        """
        p, held, transient = self.p, *self.fixed
        _, b = p.anchors(method, steps, keep=0)
        if verify is None:
            verify = steps <= p.cfg.verify_keep_max_steps
        verify = verify or steps <= b  # short: the line is not used
        room = self.device - held - p.step_inputs_bytes(steps)  # what the call may add

        def cost(keep: int) -> Cost:
            return (p.direct(method, steps, keep=keep) if verify
                    else p.call(method, steps, keep=keep)[0])

        def fits(keep: int) -> bool:
            return max(cost(keep).peak_bytes, transient) <= room

        if not fits(0):
            return KeepLimit(None, verify, None)
        first = p.first_keep  # the k after 0
        line = p.keep_line(method, steps) if steps > b else None
        if line is None:  # short: every k is predicted directly anyway
            keep = steps if steps >= first else 0
        else:
            keep = line.largest(room, steps)
            if not verify:
                return KeepLimit(keep, False, cost(0) if keep == 0 else line.at(keep))
        following = first if keep == 0 else keep + 1
        if not (fits(keep) and (following > steps or not fits(following))):
            keep = _largest(fits, first, steps) if steps >= first else 0
            keep = 0 if keep < first else keep  # none of first .. T fits: k = 0
        return KeepLimit(keep, True, cost(keep))


class KeepLimit(NamedTuple):
    """The largest keep_graphs that fits at one T (:meth:`Limits.max_keep`)."""

    keep: int | None  # k; None: not even k = 0 fits
    verified: bool  # found by predicting the whole call at k and the next k
    cost: Cost | None  # the call's predicted peak and FLOPs at k (None where keep is None)
