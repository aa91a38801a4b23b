"""Distillation, experts, evaluation and the command line on 2 processes against one process.

One spawn of 2 gloo processes on this CPU (spawning and the first torch.func call cost seconds per
process) runs every multi-process case; the references are computed here, in one process:

- distillation in float64 for every label strategy of ``LABEL_STRATEGIES`` (with the three
  gradient methods, replayed DSA and a minibatch that does not divide the set among them): the
  2-rank set, gathered, equals the one-process set to rtol 1e-10, and every rank returns it;
- a 2-rank run killed after its checkpoint resumes on 2 ranks bitwise where it would have ended;
  its checkpoint resumes on 1 process, and a 1-process checkpoint on 2 ranks (the file holds the
  whole set: a resume reshards), both ending where one process ends;
- experts spread over the ranks (one resumed from a one-process run's partial epochs) are bitwise
  the experts one process trains; evaluation spread over the ranks gives one process's accuracies
  and weights, bitwise;
- ``tesla_func.cli.main`` on each rank with torchrun's environment variables set: ``experts``,
  ``distill`` and ``evaluate``, rank 0 alone printing and writing;
- a non-finite gradient on one rank skips the update on every rank;
- bad set-ups raise the same clear error on every rank before any work, and the group stays
  usable: the valid cases run after them on the same group.

The spawn has a wall limit and every process group a timeout, so a hang fails instead of stalling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import math
import os
import re
import shutil
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tesla_func.distill as distill_module
from tesla_func import cli, distributed
from tesla_func.augment import DSA
from tesla_func.data import load_dataset
from tesla_func.distill import DistillConfig, Distiller
from tesla_func.evaluate import EvalConfig, evaluate
from tesla_func.experts import ExpertConfig, load_experts, train_experts
from tesla_func.fileio import load_tensors
from tesla_func.labels import LABEL_STRATEGIES
from tesla_func.results import load_results
from tesla_func.synthetic import load_synthetic
from tests.test_golden import _as_float64

WORLD = 2
WALL_LIMIT_S = 240  # the whole spawn; measured about 40 s on the shared 2-core machine
GROUP_TIMEOUT_S = 60
RTOL = 1e-10
# strategy -> (method, microbatch_size): every method, with and without microbatches
RUNS = {"hard": ("exact", None), "sla": ("tesla", 2), "sla-last": ("unrolled", None),
        "learned": ("exact", 3), "sla-only": ("tesla", None)}
EXPERTS = ExpertConfig(dataset="digits", num_experts=3, epochs=2, width=8, depth=2, seed=0,
                       dsa=True, batch_size=128, lr=0.1)
KILL_AT = (1, 1)  # the one-process run of EXPERTS that is killed: expert 1 after its epoch 1


def distill_config(experts_dir: Path, strategy: str = "learned", **changes) -> DistillConfig:
    method, micro = RUNS[strategy]
    base = DistillConfig(
        experts_dir=str(experts_dir), dataset="digits", ipc=2, method=method,
        label_strategy=strategy, microbatch_size=micro, iterations=3, syn_steps=3,
        match_epochs=1, max_start_epoch=2, batch_syn=7, lr_img=100.0, lr_grad_clip=0.5,
        lr_labels=5.0, eval_epochs=1, eval_models=3, save_every=2, dsa=True, seed=3,
    )
    return dataclasses.replace(base, **changes)


RESUME = {"iterations": 4}  # the killed runs: stopped after iteration 2 (the checkpoint)
EVAL = EvalConfig(arch_kwargs={"width": 4, "depth": 2}, epochs=2, lr=0.05, batch_size=32,
                  num_models=3, keep_params=True, progress=False, use_vmap=False)


def eval_sets(data):
    """A small training set and the test set, float64."""
    return data.train_images[:60], data.train_labels[:60], data.test_images, data.test_labels


# ----------------------------------------------------------------------------------------------
# The ranks


def _error_cases(folder: Path, data, experts, group) -> dict[str, str]:
    """Each bad set-up on every rank; the message each rank raised."""
    rank = dist.get_rank(group)
    experts_dir = folder / "experts"
    out: dict[str, str] = {}

    def attempt(name, make):
        try:
            make()
            out[name] = "no error"
        except Exception as error:  # noqa: BLE001 -- the test checks what was raised
            out[name] = f"{type(error).__name__}: {error}"

    def distiller(cfg, where, **kwargs):
        kwargs = {"dataset": data, "experts": experts, **kwargs}
        return Distiller(cfg, where, progress=False, group=group, **kwargs)

    cfg = distill_config(experts_dir)
    attempt("config differs", lambda: distiller(
        dataclasses.replace(cfg, seed=3 + rank), folder / "e-config"))
    attempt("checkpoint of another run", lambda: distiller(
        dataclasses.replace(cfg, lr_img=5.0), folder / "other-run"))
    attempt("folder not shared", lambda: distiller(
        cfg, folder / ("other-run-copy" if rank == 0 else "empty")))
    attempt("experts missing on rank 1", lambda: distiller(
        dataclasses.replace(cfg, experts_dir=str(folder / ("experts" if rank == 0 else "none"))),
        folder / "e-experts", experts=experts if rank == 0 else None))
    x, y, xt, yt = eval_sets(data)
    attempt("evaluation differs", lambda: evaluate(
        x, y, xt, yt, dataclasses.replace(EVAL, seed=rank), group=group))
    wrong = dataclasses.replace(data, info=dataclasses.replace(data.info, name="fashion-mnist"))
    attempt("experts on the wrong dataset on rank 1", lambda: train_experts(
        EXPERTS, folder / "e-train", dataset=data if rank == 0 else wrong, progress=False,
        group=group))
    attempt("experts folder of another config", lambda: train_experts(
        dataclasses.replace(EXPERTS, epochs=3), experts_dir, dataset=data, progress=False,
        group=group))
    return out


def _non_finite_on(bad: int, rank: int, cfg, where, data, experts, group) -> dict[str, object]:
    """One iteration whose image gradient is NaN on rank ``bad`` only: every rank must skip."""
    real = distill_module.match_trajectory

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)  # every rank takes part in the collectives
        if rank == bad:
            result = result._replace(images_grad=torch.full_like(result.images_grad, math.nan))
        return result

    distiller = Distiller(cfg, where, progress=False, dataset=data, experts=experts, group=group)
    before = distiller.state.images.clone()
    distill_module.match_trajectory = poisoned
    try:
        distiller.step()
    finally:
        distill_module.match_trajectory = real
    return {"skipped": distiller.state.skipped, "log": distiller.state.log["skipped"],
            "unchanged": torch.equal(distiller.state.images, before)}


def _run_cli(argv: list[str], environ: dict[str, str]) -> dict[str, object]:
    """``tesla_func.cli.main(argv)`` with the torchrun variables set; status and output."""
    saved = {k: os.environ.get(k) for k in environ}
    os.environ.update(environ)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = cli.main(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    return {"status": status, "out": stdout.getvalue(), "err": stderr.getvalue()}


def _worker(rank: int, folder_name: str, ports: list[int]) -> None:
    folder = Path(folder_name)
    torch.set_num_threads(1)
    results: dict[str, object] = {"timings": {}}
    tic, cpu = time.perf_counter(), time.process_time()

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        results["timings"][name] = time.perf_counter() - start
        return value

    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=WORLD,
            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
        )
        group = dist.group.WORLD
        digits = load_dataset("digits")
        data, experts = _as_float64(digits, load_experts(folder / "experts"))
        results["errors"] = timed("errors", lambda: _error_cases(folder, data, experts, group))

        for strategy in LABEL_STRATEGIES:
            results[strategy] = timed(strategy, lambda: Distiller(
                distill_config(folder / "experts", strategy), folder / f"run-{strategy}",
                progress=False, dataset=data, experts=experts, group=group).run())

        results["non-finite on rank 1"] = timed("non-finite", lambda: _non_finite_on(
            1, rank, distill_config(folder / "experts"), folder / "non-finite", data, experts,
            group))

        def make(where):
            return Distiller(distill_config(folder / "experts", **RESUME), where,
                             progress=False, dataset=data, experts=experts, group=group)

        results["two ranks, whole"] = timed("resume", lambda: make(folder / "whole").run())
        make(folder / "cut").run(stop_after=2)
        if rank == 0:  # for the one-process resume, in the test
            shutil.copytree(folder / "cut", folder / "cut-for-one")
        dist.barrier()
        results["two ranks, resumed"] = make(folder / "cut").run()
        results["one process, resumed on two ranks"] = make(folder / "cut-by-one").run()

        x, y, xt, yt = eval_sets(data)
        results["evaluate"] = timed("evaluate", lambda: evaluate(
            x, y, xt, yt, EVAL, DSA(), num_classes=10, group=group))
        results["experts"] = timed("experts", lambda: train_experts(
            EXPERTS, folder / "experts-resumed", dataset=digits, progress=False, group=group))
        dist.destroy_process_group()

        environ = {"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1"}
        cli_experts = ["experts", "--dataset", "digits", "--num-experts", "2", "--epochs", "1",
                       "--width", "4", "--depth", "2", "--no-progress", "--out",
                       str(folder / "cli-experts")]
        cli_distill = ["distill", "--experts-dir", str(folder / "cli-experts"), "--ipc", "2",
                       "--iterations", "2", "--syn-steps", "2", "--match-epochs", "1",
                       "--max-start-epoch", "1", "--batch-syn", "6", "--eval-epochs", "1",
                       "--eval-models", "2", "--label-strategy", "sla", "--no-progress",
                       "--out", str(folder / "cli-run"), "--tensorboard", str(folder / "cli-tb")]
        cli_evaluate = ["evaluate", "--synthetic", str(folder / "cli-run/synthetic.safetensors"),
                        "--epochs", "1", "--num-models", "3", "--width", "4", "--no-progress",
                        "--out", str(folder / "cli-eval.nc")]
        for name, argv, port in zip(("experts", "distill", "evaluate"),
                                    (cli_experts, cli_distill, cli_evaluate), ports):
            results[f"cli {name}"] = timed(f"cli {name}", lambda: _run_cli(
                argv, {**environ, "MASTER_PORT": str(port)}))
    except Exception:  # noqa: BLE001 -- reported to the test, which fails with it
        results["crash"] = traceback.format_exc()
    results["seconds"] = time.perf_counter() - tic
    results["cpu_seconds"] = time.process_time() - cpu
    torch.save(results, folder / f"rank{rank}.pt")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# ----------------------------------------------------------------------------------------------
# One process: the references, and the spawn


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits):
    """The experts (one process), a run of another config, a one-process checkpoint and a
    killed one-process expert run, before the ranks start."""
    folder = tmp_path_factory.mktemp("ranks")
    train_experts(EXPERTS, folder / "experts", dataset=digits, progress=False)

    def kill(index, epoch, accuracy):
        if (index, epoch) == KILL_AT:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_experts(EXPERTS, folder / "experts-resumed", dataset=digits, progress=False,
                      on_epoch=kill)
    data, experts = _as_float64(digits, load_experts(folder / "experts"))
    cfg = distill_config(folder / "experts")
    Distiller(cfg, folder / "other-run", progress=False, dataset=data,
              experts=experts).run(stop_after=1)
    shutil.copytree(folder / "other-run", folder / "other-run-copy")
    resume = distill_config(folder / "experts", **RESUME)
    Distiller(resume, folder / "cut-by-one", progress=False, dataset=data,
              experts=experts).run(stop_after=2)
    return folder


@pytest.fixture(scope="module")
def ranks(folder) -> list[dict]:
    """Spawn the 2 processes once, under a wall limit; each rank's results."""
    tic = time.perf_counter()
    context = mp.spawn(_worker, args=(str(folder), _free_ports(3)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + WALL_LIMIT_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the ranks did not finish within {WALL_LIMIT_S} s")
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, result in enumerate(results):
        assert "crash" not in result, f"rank {r} crashed:\n{result['crash']}"
    print(f"\n2-process spawn: {time.perf_counter() - tic:.1f} s wall; rank 0 after start-up "
          f"{results[0]['seconds']:.1f} s ({results[0]['cpu_seconds']:.1f} s CPU): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in results[0]["timings"].items()))
    return results


@pytest.fixture(scope="module")
def one_process(folder, digits):
    data, experts = _as_float64(digits, load_experts(folder / "experts"))

    def run(cfg, where):
        return Distiller(cfg, folder / where, progress=False, dataset=data, experts=experts).run()

    return data, experts, run


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()),
                               msg=what)


def _same_set(two, one, what):
    _close(two.images, one.images, f"{what}: images")
    if one.labels.is_floating_point():
        _close(two.labels, one.labels, f"{what}: labels")
    else:
        assert torch.equal(two.labels, one.labels), what
    assert (two.label_logits is None) == (one.label_logits is None)
    if one.label_logits is not None:
        _close(two.label_logits, one.label_logits, f"{what}: label logits")
    assert two.lr == pytest.approx(one.lr, rel=RTOL), what


# ----------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("strategy", sorted(LABEL_STRATEGIES))
def test_two_ranks_distil_the_set_of_one_process(ranks, one_process, folder, strategy):
    _, _, run = one_process
    one = run(distill_config(folder / "experts", strategy), f"one-{strategy}")
    two = ranks[0][strategy]
    _same_set(two, one, strategy)
    other = ranks[1][strategy]  # every rank returns the whole set, the same
    assert torch.equal(other.images, two.images) and torch.equal(other.labels, two.labels)
    written = load_synthetic(folder / f"run-{strategy}" / "synthetic.safetensors")
    assert torch.equal(written.images, two.images)
    assert written.header["config"]["label_strategy"] == strategy
    checkpoint, _ = load_tensors(folder / f"run-{strategy}" / "checkpoint.safetensors")
    assert checkpoint["images"].shape == one.images.shape  # one file, the whole set
    assert two.header["skipped_updates"] == 0


def test_every_label_strategy_runs_on_two_ranks():
    assert set(RUNS) == set(LABEL_STRATEGIES)
    assert {method for method, _ in RUNS.values()} == {"unrolled", "tesla", "exact"}


def test_a_killed_run_resumes_on_any_number_of_ranks(ranks, one_process, folder):
    _, _, run = one_process
    whole, resumed = ranks[0]["two ranks, whole"], ranks[0]["two ranks, resumed"]
    assert torch.equal(resumed.images, whole.images)  # same ranks: bitwise
    assert torch.equal(resumed.label_logits, whole.label_logits) and resumed.lr == whole.lr
    one = run(distill_config(folder / "experts", **RESUME), "one-whole")
    _same_set(whole, one, "2 ranks")
    _same_set(ranks[0]["one process, resumed on two ranks"], one, "1 process, then 2 ranks")
    _same_set(run(distill_config(folder / "experts", **RESUME), "cut-for-one"), one,
              "2 ranks, then 1 process")


def test_experts_spread_over_ranks_are_bitwise_one_process_s(ranks, folder):
    paths = ranks[0]["experts"]
    assert paths == ranks[1]["experts"] and len(paths) == EXPERTS.num_experts
    for index in range(EXPERTS.num_experts):
        name = f"expert_{index:03d}.safetensors"
        mine, _ = load_tensors(folder / "experts-resumed" / name)
        reference, _ = load_tensors(folder / "experts" / name)
        assert mine.keys() == reference.keys()
        for key in reference:
            assert torch.equal(mine[key], reference[key]), (name, key)


def test_evaluation_spread_over_ranks_is_one_process_s(ranks, one_process):
    data = one_process[0]
    x, y, xt, yt = eval_sets(data)
    one = evaluate(x, y, xt, yt, EVAL, DSA(), num_classes=10)
    for r in range(WORLD):
        two = ranks[r]["evaluate"]
        assert two.accuracies == one.accuracies
        for key, value in one.final_params.items():
            assert torch.equal(two.final_params[key], value), key


def test_a_non_finite_gradient_on_one_rank_skips_the_update_on_every_rank(ranks):
    for r in range(WORLD):
        assert ranks[r]["non-finite on rank 1"] == {"skipped": 1, "log": [1.0], "unchanged": True}


ERRORS = {
    "config differs": r"^ValueError: the ranks do not agree on the config: rank 0 has .*"
                      r"\"seed\": 3.*rank 1 has .*\"seed\": 4.*same command line",
    "checkpoint of another run": r"^ValueError: .*checkpoint.safetensors belongs to another run "
                                 r"\(lr_img: saved 100.0 vs now 5.0\)",
    "folder not shared": r"^ValueError: the ranks do not agree on the checkpoint: rank 0 has "
                         r"'iteration 1', rank 1 has 'iteration 0'.*shared by all nodes",
    "experts missing on rank 1": r"^FileNotFoundError: no expert files .*none.*\[raised on "
                                 r"rank\(s\) \[1\] of 2; every rank stops before any work\]",
    "evaluation differs": r"^ValueError: the ranks do not agree on the config: .*'seed': 0.*"
                          r"'seed': 1",
    "experts on the wrong dataset on rank 1": r"^ValueError: dataset 'fashion-mnist'.*does not "
                                              r"match the config's 'digits'.*\[raised on "
                                              r"rank\(s\) \[1\] of 2",
    "experts folder of another config": r"^ValueError: .*expert_000.safetensors was made with "
                                        r"another expert config \(epochs: file has 2, "
                                        r"expected 3\)",
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_bad_setups_raise_the_same_error_on_every_rank(ranks, name):
    messages = [ranks[r]["errors"][name] for r in range(WORLD)]
    for r, message in enumerate(messages):
        assert re.search(ERRORS[name], message), f"rank {r}: {message}"
    if name != "config differs" and name != "evaluation differs":
        assert messages[0] == messages[1]


def test_command_line_under_torchrun(ranks, folder, digits):
    for name in ("experts", "distill", "evaluate"):
        for r in range(WORLD):
            result = ranks[r][f"cli {name}"]
            assert result["status"] == 0, (name, r, result["err"])
        assert ranks[0][f"cli {name}"]["out"] and not ranks[1][f"cli {name}"]["out"]  # rank 0
    assert "2 experts in" in ranks[0]["cli experts"]["out"]
    assert "synthetic set:" in ranks[0]["cli distill"]["out"]
    assert len(list((folder / "cli-tb").glob("events.out.tfevents.*"))) == 1  # rank 0 logs
    assert (folder / "cli-run" / "config.toml").is_file()
    # The same set as one process distils (float32: to float32 rounding).
    cfg = load_synthetic(folder / "cli-run" / "synthetic.safetensors")
    one = Distiller(DistillConfig(**cfg.header["config"]), folder / "cli-one", progress=False,
                    dataset=digits).run()
    torch.testing.assert_close(cfg.images, one.images, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cfg.labels, one.labels, rtol=1e-4, atol=1e-6)
    accuracies = load_results(folder / "cli-eval.nc")["accuracy"].values.tolist()
    protocol = EvalConfig(arch_kwargs={"width": 4}, epochs=1, lr=cfg.lr, num_models=3,
                          progress=False)
    alone = evaluate(cfg.images, cfg.labels, digits.test_images, digits.test_labels, protocol,
                     DSA(), num_classes=10)
    assert accuracies == list(alone.accuracies)


# ----------------------------------------------------------------------------------------------
# One process only (no spawn)


def test_shards_are_contiguous_class_major_blocks():
    shards = distributed.Shards(23, 3)
    assert shards.sizes == (8, 8, 7)
    assert [shards.shard(r) for r in range(3)] == [slice(0, 8), slice(8, 16), slice(16, 23)]
    index = torch.tensor([0, 7, 8, 15, 16, 22])
    assert shards.owner(index).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"4 ranks for a synthetic set of 3 images"):
        distributed.Shards(3, 4)


def test_local_minibatches_are_the_drawn_ones_in_rank_order():
    """Each rank's rows, offset back and concatenated in rank order, are the drawn minibatch
    reordered; each row gets the transform it was drawn with, wherever it lies."""
    shards = distributed.Shards(11, 3)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randperm(11, generator=gen)[:b] for b in (6, 11, 1)]
    augment = DSA().replayable([len(b) for b in batches], torch.Generator().manual_seed(1),
                               dtype=torch.float64)
    images = torch.randn(11, 1, 8, 8, generator=gen, dtype=torch.float64)
    for step, batch in enumerate(batches):
        whole = augment(images[batch], step)  # one process: the drawn order
        parts, pieces = [], []
        for rank in range(3):
            local, ranked = distributed.local_minibatches(shards, rank, batches, augment)
            rows = local[step] + shards.start(rank)
            offset = sum(len(p) for p in parts)
            positions = torch.arange(offset, offset + len(rows))
            pieces.append(ranked(images[rows], step, rows=positions))
            parts.append(rows)
        drawn = torch.cat(parts)
        assert sorted(drawn.tolist()) == sorted(batch.tolist())
        where = [batch.tolist().index(i) for i in drawn.tolist()]
        torch.testing.assert_close(torch.cat(pieces), whole[where], rtol=0, atol=0)


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "0"}, r"only partly set \(RANK=0; missing: WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
                    r"MASTER_PORT\)"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"},
     r"0 <= RANK < WORLD_SIZE"),
    ({"RANK": "a", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"},
     r"must be integers"),
])
def test_a_broken_torchrun_environment_stops_the_command(tmp_path, capsys, monkeypatch, environ,
                                                         message):
    for key in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["evaluate", "--random-real", "1", "--dataset", "digits",
                     "--no-progress"]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not dist.is_initialized()


def test_backends_follow_the_device():
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda") == "nccl"
    with pytest.raises(ValueError, match="cpu \\(gloo\\) and cuda \\(nccl\\)"):
        distributed.backend_for("meta")


def test_every_backend_check_reads_the_one_table(monkeypatch):
    """NCCL on a CPU run is refused with the advice to use gloo; a row added to BACKENDS is all
    that backend_for, check_backend and the launch need to serve another device type."""
    monkeypatch.setattr(distributed.launch.dist, "get_backend", lambda group: "nccl")
    with pytest.raises(ValueError, match=r"^the process group uses NCCL, which moves CUDA tensors "
                                         r"only, but the work runs on cpu: use a gloo group for "
                                         r"cpu \(torchrun and the command line choose gloo for "
                                         r"cpu and nccl for cuda\)$"):
        distributed.check_backend(object(), torch.device("cpu"))
    distributed.check_backend(object(), torch.device("cuda"))  # no error, no collective
    monkeypatch.setitem(distributed.BACKENDS, "meta", distributed.Backend(
        "fake", exclusive=True, per_rank_device=False))
    monkeypatch.setattr(distributed.launch.dist, "get_backend", lambda group: "fake")
    assert distributed.backend_for("meta") == "fake"
    with pytest.raises(ValueError, match="uses FAKE, which moves META tensors only"):
        distributed.check_backend(object(), torch.device("cpu"))


def test_a_group_without_torch_distributed_is_refused(tmp_path):
    assert not dist.is_initialized()
    cfg = DistillConfig(experts_dir=str(tmp_path))
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        Distiller(cfg, tmp_path / "run", group=object())
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        train_experts(EXPERTS, tmp_path / "experts", group=object())
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        evaluate(x, torch.tensor([0, 1]), x, torch.tensor([0, 1]), EVAL, group=object())


def test_the_benchmark_script_at_tiny_sizes_on_one_process(tmp_path):
    """experiments/bench_distributed.py end to end with W = 1 only (no spawn): records, the
    memory model's fit, the table, the notes and the figure."""
    from tests.test_experiments import load_script
    from tesla_func.results import write_outputs

    bench = load_script("bench_distributed")
    cfg = bench.BenchDistributedConfig(world_sizes=(1,), microbatch_sizes=(0, 3), ipc=1,
                                       image_size=8, width=4, syn_steps=2, rounds=1)
    ds = bench.main(cfg)
    assert dict(ds.sizes) == {"world_size": 1, "microbatch": 2, "rank": 1}
    at = ds.sel(world_size=1, rank=0)
    assert (at["peak_bytes"].sel(microbatch=3) < at["peak_bytes"].sel(microbatch=0)).item()
    assert float(at["held_bytes"][0]) == 2 * 10 * 3 * 8 * 8 * 4 + 2 * 4  # images, momenta, log beta
    model = bench.memory_model(ds)
    for micro in (0, 3):  # the two points it was fitted on
        assert model(1, micro) == pytest.approx(float(at["peak_bytes"].sel(microbatch=micro)))
    text = bench.table(ds)
    assert "| 1 | none | 10 |" in text and "| 1 | 3 | 10 |" in text
    paths = write_outputs(ds, "bench_distributed", tmp_path, table=text, notes=bench.notes(ds),
                          plot=bench.plot_distributed)
    for path in paths.values():
        assert path.stat().st_size > 0
