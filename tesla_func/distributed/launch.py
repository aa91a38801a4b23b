"""Starting and stopping work on several processes: the backends, a torchrun launch, the set-up
handshake that raises one error on every rank, and waiting for files that other ranks write.

What the package knows about ``torch.distributed`` backends is the one table :data:`BACKENDS`
(device type -> backend and what it needs); :func:`backend_for`, :func:`check_backend`,
:func:`collective_device` and :func:`torchrun_group` all read it. A new backend is one row.

A run on several processes must never leave one rank waiting in a collective that another rank
never reaches: a set-up error on any rank, or ranks that disagree on what they must share, is
raised on every rank before any work (:func:`together`, :func:`raise_together`).
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Backend:
    """A ``torch.distributed`` backend, as a run on one device type uses it."""

    name: str  # torch.distributed's name of the backend
    exclusive: bool  # it moves tensors of its device type only: a run elsewhere is refused
    per_rank_device: bool  # each process of a node takes device LOCAL_RANK of its device type


BACKENDS: dict[str, Backend] = {
    "cpu": Backend("gloo", exclusive=False, per_rank_device=False),
    "cuda": Backend("nccl", exclusive=True, per_rank_device=True),
}
"""Device type -> the backend a run on it uses (torchrun, the command line, the checks)."""


def _supported() -> str:
    """'cpu (gloo) and cuda (nccl)': the device types the table serves, for messages."""
    listed = [f"{kind} ({b.name})" for kind, b in BACKENDS.items()]
    return ", ".join(listed[:-1]) + " and " + listed[-1] if len(listed) > 1 else listed[0]


def backend_for(device: str | torch.device) -> str:
    """The backend a run on ``device`` uses (:data:`BACKENDS`), or a clear error."""
    kind = torch.device(device).type
    if kind not in BACKENDS:
        raise ValueError(f"distributed runs support device {_supported()}, got {device}")
    return BACKENDS[kind].name


def _group_backend(group: object) -> tuple[str, Backend] | None:
    """(device type, backend) of the table row whose backend ``group`` uses; None for a
    backend the table does not list (a group the caller made: treated as moving CPU tensors)."""
    name = dist.get_backend(group)
    return next(((kind, b) for kind, b in BACKENDS.items() if b.name == name), None)


def collective_device(group: object) -> torch.device:
    """Where the small tensors of the package's own collectives live: the current device of the
    backend's device type where it moves only those (NCCL: CUDA tensors), else the CPU."""
    row = _group_backend(group)
    if row is None or not row[1].exclusive:
        return torch.device("cpu")
    kind = row[0]
    return torch.device(kind, getattr(torch, kind).current_device())


def check_backend(group: object, device: torch.device) -> None:
    """Refuse work on a device whose tensors the group's backend cannot move (NCCL on cpu).
    The same answer on every rank, no collective."""
    row = _group_backend(group)
    kind = torch.device(device).type
    if row is not None and row[1].exclusive and kind != row[0]:
        fit = f"a {BACKENDS[kind].name} group for {kind}" if kind in BACKENDS else (
            f"a device of {_supported()}")
        chosen = " and ".join(f"{b.name} for {k}" for k, b in BACKENDS.items())
        raise ValueError(
            f"the process group uses {row[1].name.upper()}, which moves {row[0].upper()} tensors "
            f"only, but the work runs on {device}: use {fit} (torchrun and the command line "
            f"choose {chosen})"
        )


def check_group(group: object) -> tuple[int, int]:
    """(this process's rank in ``group``, the group's size), or a clear error."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) on every rank first and pass "
            "group=torch.distributed.group.WORLD (or a new_group), or pass group=None for a "
            "call on one process"
        )
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives a non-member
        raise ValueError("this process is not a member of group: call with a group it is in")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD), got {type(group).__name__}"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group: call with a group it is in")
    return rank, dist.get_world_size(group)


def raise_together(
    group: object, error: BaseException | None, fingerprint: Mapping[str, str] | None
) -> None:
    """The set-up handshake: every rank raises when any rank failed or the ranks disagree.

    Call it on every rank after the rank's own set-up, with the exception the set-up raised
    (None if it went well) and, where it went well, a fingerprint (name -> text) of what every
    rank must share. One ``all_gather_object``. When every rank failed with the same message, each
    raises its own error; when some failed, every rank raises the first failing rank's error (its
    type where it is a built-in exception, else RuntimeError) naming the failing ranks; when the
    fingerprints differ, every rank raises a ValueError naming the first difference.
    """
    world = dist.get_world_size(group)
    mine = None if error is None else (type(error).__name__, _message(error))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (mine, None if error else dict(fingerprint or {})),
                           group=group)
    failed = [r for r, (e, _) in enumerate(gathered) if e is not None]
    if failed:
        name, text = gathered[failed[0]][0]
        if len(failed) == world and all(gathered[r][0][1] == text for r in failed):
            raise error
        kind = getattr(builtins, name, None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = RuntimeError
        raise kind(f"{text} [raised on rank(s) {failed} of {world}; every rank stops before any "
                   "work]") from error
    prints = [f for _, f in gathered]
    for key in prints[0]:
        other = next((r for r in range(world) if prints[r].get(key) != prints[0][key]), None)
        if other is not None:
            raise ValueError(
                f"the ranks do not agree on {key}: rank 0 has {prints[0][key]!r}, rank {other} "
                f"has {prints[other].get(key)!r}. {_advice(key)}"
            )


@contextlib.contextmanager
def together(
    group: object | None, fingerprint: Callable[[], Mapping[str, str]] | None = None
) -> Iterator[None]:
    """Run a block of set-up on every rank, then :func:`raise_together`: an exception in the
    block on any rank is raised on every rank, and (when none raised) ``fingerprint()``, called
    after the block, must agree. ``group`` None: the block runs as it is."""
    if group is None:
        yield
        return
    error = None
    try:
        yield
    except Exception as caught:  # noqa: BLE001 -- raised on every rank just below
        error = caught
    raise_together(group, error, None if error or fingerprint is None else fingerprint())


def _message(error: BaseException) -> str:
    return error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)


_ADVICE = {
    "the checkpoint": "Every rank must see the same output folder (one folder shared by all "
    "nodes): rank 0 writes the checkpoint and every rank resumes from it.",
}


def _advice(key: str) -> str:
    return _ADVICE.get(key, "Every rank must run the same config on the same data: launch them "
                       "with the same command line.")


def wait_for_files(paths: Sequence[Path], folder: Path, stall_s: float, poll_s: float = 0.5,
                   ) -> None:
    """Wait until every file of ``paths`` exists, while ``folder`` keeps changing.

    Ranks that train different experts finish at different times, longer apart than a
    collective's timeout may allow; the files they write (an expert file, or an epoch checkpoint
    under ``folder``) show that they are alive. Raises TimeoutError when nothing under
    ``folder`` changed for ``stall_s`` seconds and files are still missing: a rank failed, or the
    folder is not shared between the ranks' machines.
    """

    def newest() -> float:
        return max((p.stat().st_mtime for p in folder.rglob("*.safetensors")), default=0.0)

    last, seen = time.monotonic(), newest()
    while True:
        missing = [p for p in paths if not p.exists()]
        if not missing:
            return
        now = newest()
        if now != seen:
            seen, last = now, time.monotonic()
        elif time.monotonic() - last > stall_s:
            raise TimeoutError(
                f"{len(missing)} expert file(s) never appeared ({missing[0].name}, ...) and "
                f"nothing under {folder} changed for {stall_s:.0f} s: a rank failed, or {folder} "
                "is not one folder shared by every rank"
            )
        time.sleep(poll_s)


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets for every process (among others) and the launch reads."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch."""

    rank: int
    world: int
    local_rank: int  # its index on its node: the device it uses (per_rank_device backends)


def launch_from_env(environ: Mapping[str, str]) -> Launch | None:
    """The torchrun launch described by ``environ``, None when none of its variables is set.

    Raises ValueError naming the variables when only some are set, or their values do not fit
    together (so every rank of a broken launch stops with the same message, before any work).
    """
    given = {k: environ[k] for k in TORCHRUN_VARIABLES if environ.get(k, "") != ""}
    if not given:
        return None
    missing = [k for k in TORCHRUN_VARIABLES if k not in given]
    if missing:
        shown = ", ".join(f"{k}={v}" for k, v in given.items())
        raise ValueError(
            f"the torchrun environment is only partly set ({shown}; missing: "
            f"{', '.join(missing)}): launch with `torchrun --nproc_per_node=N -m tesla_func.cli "
            f"...`, which sets them all, or unset {', '.join(given)} to run one process"
        )
    try:
        rank, world, local = (int(given[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        int(given["MASTER_PORT"])
    except ValueError as err:
        raise ValueError(f"RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers, "
                         f"got {given}") from err
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"need WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got "
                         f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return Launch(rank, world, local)


def _take_rank_device(device: str | torch.device, local_rank: int) -> None:
    """Make device ``local_rank`` of ``device``'s type this process's own (so ``device="cuda"``
    means its own GPU), or say that the node has too few."""
    kind = torch.device(device).type
    module = getattr(torch, kind)  # torch.cuda, and the like for other device types
    if not module.is_available() or local_rank >= module.device_count():
        raise ValueError(
            f"device {device} on LOCAL_RANK {local_rank} needs {kind.upper()} device "
            f"{local_rank}, but this node has {module.device_count()}: launch at "
            "most that many processes per node (--nproc_per_node)"
        )
    module.set_device(local_rank)


@contextlib.contextmanager
def torchrun_group(
    device: str | torch.device, timeout_s: float, environ: Mapping[str, str] | None = None
) -> Iterator[object | None]:
    """The process group of a torchrun launch (read from the environment), or None for one
    process; destroyed on exit.

    The backend follows ``device`` (:data:`BACKENDS`: gloo for cpu, nccl for cuda, where the
    process uses CUDA device ``LOCAL_RANK``, so ``device="cuda"`` means its own GPU). Every
    collective of the group fails after ``timeout_s`` seconds instead of waiting forever. A
    torch.distributed already initialised (by the caller) is used as it is and left alone.
    """
    launch = launch_from_env(os.environ if environ is None else environ)
    if launch is None:
        yield None
        return
    backend = backend_for(device)
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    if BACKENDS[torch.device(device).type].per_rank_device:
        _take_rank_device(device, launch.local_rank)
    dist.init_process_group(
        backend, init_method="env://", rank=launch.rank, world_size=launch.world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
