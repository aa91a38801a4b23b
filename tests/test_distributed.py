"""Matching on several processes (``group=``) against one process on the whole set.

An independent check: a small MLP of this file's own, a synthetic set cut into uneven shards, and
per-step minibatches whose rows are spread over the ranks (some ranks hold none of a step; one step
lies on one rank only). Each rank calls ``match_trajectory`` with its shard and its rows; one
process then calls it on the concatenated set and minibatches. Loss, beta gradient (the same on
every rank, bit for bit) and each rank's image and label gradients (its rows of the whole-set
result) must agree in float64 to rtol 1e-10, for every method, with and without microbatches,
with replayed DSA and with soft labels. Bad input must raise on every rank, before any work, and
leave the group usable: the valid cases run after the bad ones on the same group.

All cases run in one spawn of 3 gloo processes on this CPU (spawning costs seconds per process):
on the world group (3 ranks) and on ``new_group([1, 2])`` (2 ranks; rank 0 checks that a
non-member is refused). The spawn has a wall limit, so a hang fails the tests instead of stalling
them, and the process group a timeout.
"""

from __future__ import annotations

import datetime
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tesla_func import match_trajectory
from tesla_func.augment import DSA
from tesla_func.distributed import all_reduce_sum

WORLD = 3
SUBGROUP = (1, 2)  # the 2-rank cases run on these global ranks
WALL_LIMIT_S = 240  # the whole spawn; measured about 25 s on the shared 2-core machine
GROUP_TIMEOUT_S = 60
RTOL = 1e-10
STEPS = 3


class ShardMLP(nn.Module):
    """The test's own model: nothing of the library's ConvNet."""

    def __init__(self, channels: int, side: int, classes: int, batchnorm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(channels * side * side, 5)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(5))  # train mode: couples the rows
        layers += [nn.Tanh(), nn.Linear(5, classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


@dataclass(frozen=True)
class Case:
    name: str
    world: int  # 3: the world group; 2: the subgroup SUBGROUP
    method: str = "exact"
    microbatch_size: int | None = None
    dsa: bool = False
    soft: bool = False
    keep_graphs: int = 0
    state_stride: int = 1
    seed: int = 0
    batchnorm: bool = False
    fault: str = ""  # how the ranks' calls are spoiled (error cases)
    error: str = ""  # the message every rank must raise (regex), for error cases


def _valid_cases() -> list[Case]:
    cases = []
    for world in (WORLD, len(SUBGROUP)):
        for method in ("unrolled", "tesla", "exact"):
            for micro in (None, 2):
                for dsa, soft in ((False, False), (True, True), (True, False), (False, True)):
                    if world == 2 and (dsa, soft) in ((True, False), (False, True)):
                        continue  # the 2-rank group runs the two extreme combinations
                    cases.append(
                        Case(
                            f"{world}ranks-{method}-mb{micro}-{'dsa' if dsa else 'plain'}-"
                            f"{'soft' if soft else 'hard'}",
                            world,
                            method,
                            micro,
                            dsa,
                            soft,
                            seed=len(cases),
                        )
                    )
    cases += [
        Case("3ranks-exact-keep2-stride2", WORLD, "exact", 2, True, True, 2, 2, seed=100),
        Case("3ranks-tesla-keep3", WORLD, "tesla", None, True, False, 3, seed=101),
        Case("2ranks-exact-keep1-mb1", 2, "exact", 1, True, True, 1, seed=102),
    ]
    return cases


ERROR_CASES = [
    Case("beta differs", WORLD, fault="beta",
         error=r"differ in beta \(beta: rank 0 has 0\.1, rank 2 has 0\.101\)"),
    Case("method differs", WORLD, fault="method",
         error=r"differ in method \(method: rank 0 has 'tesla', rank 1 has 'exact'\)"),
    Case("T differs", WORLD, fault="steps",
         error=r"differ in T = len\(batches\) \(T = len\(batches\): rank 0 has 3, rank 2 has 2\)"),
    Case("keep_graphs differs", WORLD, fault="keep_graphs", error=r"differ in keep_graphs"),
    Case("microbatch differs", 2, fault="microbatch", error=r"differ in microbatch_size"),
    Case("start differs", WORLD, fault="start",
         error=r"differ in start \(rank 0 and rank 1 hold different start\)"),
    Case("step without rows", WORLD, fault="no_rows",
         error=r"step\(s\) \[1\] have no rows on any rank"),
    Case("microbatch_size 0", WORLD, fault="microbatch_zero",
         error=r"microbatch_size must be an int >= 1"),
    Case("bad index on rank 0", WORLD, fault="index",
         error=r"batches\[0\] holds indices in .*|the arguments of rank\(s\) \[0\] are invalid"),
    Case("train-mode BatchNorm split over ranks", WORLD, batchnorm=True,
         error=r"split \(its rows lie on \d ranks of group\), but the model's BatchNorm"),
    Case("two-argument augment split over ranks", 2, fault="two_arg_augment",
         error=r"augment must accept the keyword rows="),
]
CASES = _valid_cases() + ERROR_CASES
BY_NAME = {c.name: c for c in CASES}


def build(case: Case):
    """The whole problem, the same in every process: model, start, target, the concatenated set,
    beta, each rank's local batches, the shard sizes and the augmentation (drawn for the whole
    minibatches)."""
    gen = torch.Generator().manual_seed(case.seed)
    channels, side, classes = 2, 6, 3
    model = ShardMLP(channels, side, classes, case.batchnorm).double()
    start = {
        k: 0.5 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
        for k, v in model.named_parameters()
    }
    target = {
        k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
        for k, v in start.items()
    }
    shards = [3 + 2 * (r % 2) for r in range(case.world)]  # uneven: 3, 5, 3
    n = sum(shards)
    images = torch.randn(n, channels, side, side, generator=gen, dtype=torch.float64)
    if case.soft:
        labels = 2.0 * torch.randn(n, classes, generator=gen, dtype=torch.float64)
    else:
        labels = torch.randint(0, classes, (n,), generator=gen)
    local = [[None] * STEPS for _ in range(case.world)]  # local[r][i]: rank r's rows of step i
    for i in range(STEPS):
        holder = 1 if i == 0 else i % case.world  # holds at least one row of step i
        for r, size in enumerate(shards):
            if i == 0 and r != 1:
                count = 0  # step 0 lies on rank 1 only
            else:
                low = 1 if r == holder else 0
                count = int(torch.randint(low, size + 1, (1,), generator=gen))
            local[r][i] = torch.randperm(size, generator=gen)[:count]
    sizes = [sum(len(local[r][i]) for r in range(case.world)) for i in range(STEPS)]
    augment = (
        DSA().replayable(sizes, torch.Generator().manual_seed(case.seed + 1), dtype=torch.float64)
        if case.dsa
        else None
    )
    return model, start, target, images, labels, torch.tensor(0.1, dtype=torch.float64), local, \
        shards, augment


def whole(case: Case):
    """One process on the concatenated set and minibatches (rows in rank order)."""
    model, start, target, images, labels, beta, local, shards, augment = build(case)
    offsets = [sum(shards[:r]) for r in range(case.world)]
    batches = [torch.cat([local[r][i] + offsets[r] for r in range(case.world)])
               for i in range(STEPS)]
    return match_trajectory(
        model, start, target, images, labels, beta, batches, method=case.method, augment=augment,
        keep_graphs=case.keep_graphs, state_stride=case.state_stride,
    )


def shard_call(case: Case, rank: int, group):
    """This rank's call, with its shard, its rows and the case's fault."""
    model, start, target, images, labels, beta, local, shards, augment = build(case)
    lo = sum(shards[:rank])
    images, labels = images[lo : lo + shards[rank]], labels[lo : lo + shards[rank]]
    batches = list(local[rank])
    method, micro, keep = case.method, case.microbatch_size, case.keep_graphs
    if case.fault == "beta" and rank == case.world - 1:
        beta = beta * 1.01
    if case.fault == "method" and rank == 0:
        method = "tesla"
    if case.fault == "steps" and rank == case.world - 1:
        batches = batches[:-1]
    if case.fault == "keep_graphs" and rank == 0:
        keep = 1
    if case.fault == "microbatch" and rank == 0:
        micro = 2
    if case.fault == "start" and rank == 1:
        start = dict(start)
        key = next(iter(start))
        start[key] = start[key].clone()
        start[key].view(-1)[0] += 1e-9
    if case.fault == "no_rows":
        batches[1] = batches[1][:0]
    if case.fault == "microbatch_zero":
        micro = 0
    if case.fault == "index" and rank == 0:
        batches[0] = torch.tensor([0, 99])
    if case.fault == "two_arg_augment":
        def augment(x, step):
            return x
    return match_trajectory(
        model, start, target, images, labels, beta, batches, method=method, augment=augment,
        keep_graphs=keep, state_stride=case.state_stride, microbatch_size=micro, group=group,
    )


def _collective_checks(group) -> dict:
    """all_reduce_sum under torch.func: vjp, grad of grad and vmap (values checked by the test)."""
    rank = dist.get_rank(group)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64) * (rank + 1)

    def f(x):
        return (all_reduce_sum(x * x, group) ** 2).sum()

    out, pullback = torch.func.vjp(f, x)
    (vjp_x,) = pullback(torch.ones_like(out))
    hess_diag = torch.func.grad(lambda x: torch.func.grad(f)(x).sum())(x)
    batched = torch.func.vmap(lambda v: all_reduce_sum(v, group))(torch.stack([x, 3 * x]))
    return {"f": out, "vjp": vjp_x, "grad_of_grad": hess_diag, "vmap": batched}


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
    )
    subgroup = dist.new_group(list(SUBGROUP))  # every rank must call it, members or not
    results: dict[str, object] = {}
    timings: dict[str, float] = {}
    results["timings"] = timings
    tic = time.perf_counter()
    try:
        results["collective"] = _collective_checks(dist.group.WORLD)
        # Error cases first: the valid ones after them show the group stayed in step.
        for case in ERROR_CASES + _valid_cases():
            if case.world == WORLD:
                group, group_rank = dist.group.WORLD, rank
            elif rank in SUBGROUP:
                group, group_rank = subgroup, SUBGROUP.index(rank)
            else:
                continue
            start = time.perf_counter()
            try:
                results[case.name] = shard_call(case, group_rank, group)._asdict()
            except (TypeError, ValueError) as error:
                results[case.name] = {"error": f"{type(error).__name__}: {error}"}
            timings[case.name] = time.perf_counter() - start
        if rank not in SUBGROUP:
            try:
                shard_call(BY_NAME["2ranks-exact-keep1-mb1"], 0, subgroup)
            except ValueError as error:
                results["non-member"] = str(error)
    except Exception:  # noqa: BLE001 -- reported to the test, which fails with it
        results["crash"] = traceback.format_exc()
    results["seconds"] = time.perf_counter() - tic
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Spawn the 3 processes once, under a wall limit; each rank's results by global rank."""
    folder = tmp_path_factory.mktemp("distributed")
    tic = time.perf_counter()
    context = mp.spawn(
        _worker, args=(str(folder / "store"), str(folder)), nprocs=WORLD, join=False
    )
    deadline = time.monotonic() + WALL_LIMIT_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            alive = [p.pid for p in context.processes if p.is_alive()]
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the ranks did not finish within {WALL_LIMIT_S} s (alive: {alive})")
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, result in enumerate(results):
        assert "crash" not in result, f"rank {r} crashed:\n{result['crash']}"
    print(f"\n3-process spawn: {time.perf_counter() - tic:.1f} s wall; on each rank after start-up "
          "(all / inside its match_trajectory calls): "
          + ", ".join(f"rank {r} {res['seconds']:.1f} / {sum(res['timings'].values()):.1f} s"
                      for r, res in enumerate(results)))
    return results


def _members(case: Case) -> list[int]:
    return list(range(WORLD)) if case.world == WORLD else list(SUBGROUP)


def _close(actual, expected, what):
    torch.testing.assert_close(
        actual, expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()) + 1e-300, msg=what
    )


@pytest.mark.parametrize("name", [c.name for c in _valid_cases()])
def test_shards_on_ranks_equal_one_process_on_the_whole_set(ranks, name):
    case = BY_NAME[name]
    reference = whole(case)
    _, _, _, _, _, _, _, shards, _ = build(case)
    members = _members(case)
    got = [ranks[r][name] for r in members]
    for r, result in zip(members, got):
        assert "error" not in result, f"rank {r}: {result['error']}"
    for result in got[1:]:  # the same trajectory on every rank, bit for bit
        assert torch.equal(result["loss"], got[0]["loss"])
        assert torch.equal(result["beta_grad"], got[0]["beta_grad"])
    _close(got[0]["loss"], reference.loss, f"{name}: loss")
    _close(got[0]["beta_grad"], reference.beta_grad, f"{name}: beta_grad")
    images_grad = torch.cat([result["images_grad"] for result in got])  # shards in rank order
    assert [len(result["images_grad"]) for result in got] == shards
    _close(images_grad, reference.images_grad, f"{name}: images_grad")
    if case.soft:
        _close(torch.cat([r["labels_grad"] for r in got]), reference.labels_grad,
               f"{name}: labels_grad")
    else:
        assert all(r["labels_grad"] is None for r in got)


@pytest.mark.parametrize("name", [c.name for c in ERROR_CASES])
def test_bad_input_raises_on_every_rank(ranks, name):
    case = BY_NAME[name]
    for r in _members(case):
        result = ranks[r][name]
        assert "error" in result, f"rank {r} did not raise"
        assert re.search(case.error, result["error"]), (
            f"rank {r}: {result['error']}"
        )


def test_a_process_outside_the_group_is_refused(ranks):
    assert "not a member of group" in ranks[0]["non-member"]


def test_all_reduce_sum_differentiates_under_torch_func(ranks):
    """Rank r computes f = ||y||^2, y = AR(x_r^2) (AR: the sum over the 3 ranks), x_r = (r+1)(1, 2).

    y = 14 (1, 4). Backward through AR sums the ranks' cotangents: df/dx_r = AR(2 y) 2 x_r
    = 12 y x_r. Differentiating sum(df/dx_r) again: 2 AR(2y) = 12 y directly, plus through y:
    AR(2 * AR(2 x_r)) 2 x_r = 24 S x_r with S = sum_r x_r = 6 (1, 2)."""
    y = 14.0 * torch.tensor([1.0, 4.0], dtype=torch.float64)
    total = 6.0 * torch.tensor([1.0, 2.0], dtype=torch.float64)
    for r in range(WORLD):
        got = ranks[r]["collective"]
        x = torch.tensor([1.0, 2.0], dtype=torch.float64) * (r + 1)
        torch.testing.assert_close(got["f"], (y**2).sum())
        torch.testing.assert_close(got["vjp"], 12 * y * x)
        torch.testing.assert_close(got["grad_of_grad"], 12 * y + 24 * total * x)
        batch = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64) * 6  # sum_r (r+1)
        torch.testing.assert_close(got["vmap"], batch)


def test_group_without_torch_distributed_initialised():
    assert not dist.is_initialized()
    model = ShardMLP(1, 2, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match=r"torch.distributed is not initialised.*"
                                         r"init_process_group.*group=None"):
        match_trajectory(
            model, params, {k: v + 1 for k, v in params.items()}, torch.zeros(2, 1, 2, 2),
            torch.tensor([0, 1]), 0.1, [torch.tensor([0])], group=object(),
        )


def test_cases_cover_every_method_split_augmentation_and_label_kind():
    valid = _valid_cases()
    for world in (WORLD, 2):
        mine = [c for c in valid if c.world == world]
        assert {c.method for c in mine} == {"unrolled", "tesla", "exact"}
        assert {c.microbatch_size for c in mine} >= {None, 2}
        assert any(c.dsa and c.soft for c in mine) and any(not c.dsa and not c.soft for c in mine)
    _, _, _, _, _, _, local, _, _ = build(valid[0])
    assert [len(local[r][0]) for r in range(WORLD)][0::2] == [0, 0]  # step 0: rank 1 only
