"""Work on several processes (torch.distributed): matching, distillation, experts, evaluation.

One module per job; this package re-exports their public names, so ``from
tesla_func.distributed import X`` and ``distributed.X`` work for all of them:

- :mod:`~tesla_func.distributed.collectives`: the sums that cross ranks (a differentiable
  all-reduce, sums of parameter dicts and floats), the barrier, checksums;
- :mod:`~tesla_func.distributed.handshake`: the check before a matching call on several ranks
  (the only module that reads :mod:`tesla_func.validation`);
- :mod:`~tesla_func.distributed.shards`: who holds which rows of the synthetic set and of the
  minibatches, and which experts or evaluation models;
- :mod:`~tesla_func.distributed.launch`: the backends (:data:`BACKENDS`, one row per device
  type), the torchrun launch, set-up errors raised on every rank, waiting for files.

Matching (``match_trajectory(..., group=...)``): each rank holds a shard of the synthetic set and,
for every step i, some rows of its minibatch; the step's minibatch is the concatenation of every
rank's rows in rank order (rank r's rows take positions o_r .. o_r + n_r - 1,
o_r = n_0 + ... + n_{r-1}), of size B = sum_r n_r. The inner loss is the mean over all B rows, so
everything of the step splits over ranks exactly as it does over microbatches
(tesla_func.matching, Eqs. M1-M2; docs/reference.md section 10)::

    g_i = sum_r sum_{c on r} grad_theta (n_c / B) l_c          H_i u = sum_r sum_{c on r} H_c u

Only parameter-sized tensors cross ranks: the step gradients g_i and the Hessian-vector products
H_i u, summed by one all-reduce each (:func:`sum_over_ranks`; ``unrolled`` uses the
differentiable :func:`all_reduce_sum`). The images' and labels' gradients J_c^T u stay on the rank
that holds those rows. Every rank therefore walks the same student trajectory, bit for bit, and
returns the same loss and beta gradient. In ``unrolled`` autodiff runs through the all-reduces:
every rank computes the same L and differentiates its share L / W (W ranks); the backward of a
sum all-reduce sums the ranks' cotangents, which gives each rank dL/dX of its own rows, and its
share of dL/dbeta (beta is held by every rank), summed over the ranks at the end. Before any
work, :func:`matching_handshake` makes bad input raise on every rank.
"""

from tesla_func.distributed.collectives import (
    all_reduce_sum,
    barrier,
    checksum,
    checksums,
    max_float,
    sum_floats,
    sum_over_ranks,
    sum_over_ranks_differentiable,
    world_size,
)
from tesla_func.distributed.handshake import FIELDS, Layout, fingerprint, matching_handshake
from tesla_func.distributed.launch import (
    BACKENDS,
    TORCHRUN_VARIABLES,
    Backend,
    Launch,
    backend_for,
    check_backend,
    check_group,
    collective_device,
    launch_from_env,
    raise_together,
    together,
    torchrun_group,
    wait_for_files,
)
from tesla_func.distributed.shards import (
    RankOrderAugment,
    SetRanks,
    Shards,
    gather_rows,
    local_minibatches,
    spread,
)

__all__ = [
    "BACKENDS",
    "FIELDS",
    "TORCHRUN_VARIABLES",
    "Backend",
    "Launch",
    "Layout",
    "RankOrderAugment",
    "SetRanks",
    "Shards",
    "all_reduce_sum",
    "backend_for",
    "barrier",
    "check_backend",
    "check_group",
    "checksum",
    "checksums",
    "collective_device",
    "fingerprint",
    "gather_rows",
    "launch_from_env",
    "local_minibatches",
    "matching_handshake",
    "max_float",
    "raise_together",
    "spread",
    "sum_floats",
    "sum_over_ranks",
    "sum_over_ranks_differentiable",
    "together",
    "torchrun_group",
    "wait_for_files",
    "world_size",
]
