"""Distillation by trajectory matching (Algorithm 1 of MTT / TESLA): a short orchestrator.

Each iteration:

1. pick an expert e ~ U{experts} and a start epoch t ~ U{0 .. max_start_epoch - 1};
   start = theta*_{e,t}, target = theta*_{e,t+M} with M = ``match_epochs``;
2. draw T = ``syn_steps`` non-overlapping minibatches of ``batch_syn`` synthetic images
   (:func:`tesla_func.sampling.draw_minibatches`) and the DSA parameters of every step (replayed
   in every pass);
3. ask the label strategy (:mod:`tesla_func.labels`) for this iteration's labels;
4. ``match_trajectory(..., method=cfg.method)`` -> L and dL/dX, dL/dY, dL/dbeta;
5. one SGD-with-momentum step (:mod:`tesla_func.optim`) on what the strategy learns: the images,
   the label logits, and always log(beta).

The student learning rate stays positive through its parametrisation beta = exp(log_beta): the
update is on log_beta, with dL/dlog_beta = beta * dL/dbeta. A non-finite loss or gradient (the
label-logit gradient only if the strategy learns the logits), or an update that would make a
learned tensor non-finite (a finite gradient times a too-large ``lr_img`` can overflow), skips
the whole update, momenta included; the skip is counted and logged, so a NaN loss cannot reach
the images or beta (the public code has no such guard, and beta can explode or turn negative
there). ``lr_grad_clip`` bounds how far beta can move in one iteration: one segment with a large
|dL/dlog_beta| (4.3 against a typical 0.05-0.3) can take beta from 0.19 to 0.003 in one step,
after which the student no longer moves and the image gradient stays zero. ``beta_bound`` bounds
beta itself: log beta is clipped to log(beta0) -+ log(beta_bound), and an update that would make
beta = exp(log beta) zero or infinite (possible without the bound) is skipped like a non-finite
one.

A run that cannot go on stops instead of dying later: when beta sits at a bound, or once
``max_skipped`` updates were skipped, :meth:`Distiller.run` writes the last good set (the set,
``log.nc``, its picture and the checkpoint) and raises :class:`DistillationStopped`, whose
message names the cause and the flag to change. Results that cannot be good are warned of once
each (:func:`tesla_func.runchecks.warn`) and kept in the set's header and ``log.nc``: experts at
chance, T longer than the expert's steps, beta 100x from its start, images 10x the real images'
norm, a teacher labelling fewer than half the classes. The checks themselves, before the run and
after each iteration, are :mod:`tesla_func.distill_checks`.

Fields of the config left None are resolved from the dataset and the experts when the run starts
(:meth:`DistillConfig.resolved`); the run saves the resolved config and the record of the choices.

The state (:mod:`tesla_func.distill_state`) is checkpointed atomically every ``save_every``
iterations; a resumed run continues from the same state and, on CPU with the same seed and thread
count, ends with bitwise the same synthetic set as an uninterrupted run.

The log also records how far the labels drift (:func:`tesla_func.labels.label_drift`): each
iteration, the fraction of images whose teacher label (the argmax of the labels the iteration
trained on) is not the class the image started in, and the images per class by that label. The
dataset is the one the experts recorded (``dataset_info`` in their header: reloaded with
:func:`tesla_func.data.load_dataset_like` and checked), so experts of one image folder do not
distil another.
Several processes (``Distiller(cfg, out, group=...)``, or ``torchrun ... -m tesla_func.cli
distill``): the synthetic set is sharded. Rank r holds a contiguous block of the class-major rows
of the images, the label logits and their momenta (:class:`tesla_func.distributed.Shards`); log
beta, the generator, the minibatch order and the logs are replicated. Every rank draws the same
expert, start epoch, minibatch indices and DSA parameters from the same generator and keeps its
own rows (:func:`tesla_func.distributed.local_minibatches`), so the union over ranks is what one
process draws, and W ranks end with the synthetic set of one process up to float rounding. The
label strategies work on each rank's rows (a teacher labels the rank's own images). The
non-finite guard is agreed over the ranks, so all of them update or all skip. Rank 0 gathers the
shards and writes the checkpoint (the one-process format: a run resumes on any number of ranks,
each taking its rows), the final set and the log; progress bars and messages come from rank 0.
Evaluation spreads its models over the ranks (:func:`tesla_func.evaluate.evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tesla_func import distill_checks as checks
from tesla_func import distributed
from tesla_func.augment import DSA
from tesla_func.configfile import CONFIG_TOML, write_config_toml
from tesla_func.data import Dataset, DatasetShape
from tesla_func.distill_config import IMAGE_INITS, DistillConfig  # noqa: F401 (re-exported)
from tesla_func.distill_state import (
    CLASS_LOG_FIELDS,
    EVAL_FIELDS,
    LOG_FIELDS,
    ROW_SHARDED,
    initial_state,
    load_checkpoint,
    save_checkpoint,
)
from tesla_func.evaluate import EvalConfig, EvalResult, evaluate
from tesla_func.experts import ExpertTrajectory
from tesla_func.labels import LabelInputs, label_drift, teacher_logits
from tesla_func.matching import match_trajectory
from tesla_func.models import ConvNet
from tesla_func.optim import SGDState, sgd
from tesla_func.planner.auto import KeepChoice, RunShape, choose_keep_graphs
from tesla_func.provenance import provenance
from tesla_func.runchecks import check_device, check_output_folder, warn
from tesla_func.sampling import draw_minibatches
from tesla_func.synthetic import SyntheticSet, snapshot_path
from tesla_func.tracking import RunLogger

CHECKPOINT = "checkpoint.safetensors"


class DistillationStopped(RuntimeError):
    """A run stopped before its last iteration because it could not go on (its beta reached a
    bound, or too many updates were skipped); its last good set was written. The message names
    the cause and the flag to change."""


class Distiller:
    """Runs :class:`DistillConfig`; ``run()`` returns the synthetic set and writes ``out_dir``.

    ``group``: a ``torch.distributed`` process group whose ranks share the run (every rank
    constructs a Distiller with the same config, data and experts, and the same ``out_dir``, a
    folder all of them see); None: one process. See the module docstring. Bad set-ups raise on
    every rank before any work: an error on any rank, ranks that differ in config, data, experts
    or the checkpoint they found, more ranks than synthetic images, an NCCL group on CPU, or
    torch.distributed not initialised.

    ``logger``: where the iteration log, the evaluations and the set's image grid (every snapshot
    and at the end) also go (:mod:`tesla_func.tracking`; only rank 0 logs); None: nowhere else.
    """

    def __init__(
        self,
        cfg: DistillConfig,
        out_dir: str | Path,
        *,
        progress: bool = True,
        dataset: Dataset | None = None,
        experts: list[ExpertTrajectory] | None = None,
        group: object | None = None,
        logger: RunLogger | None = None,
    ):
        self.group, self.rank = group, 0
        if group is None:
            self._build(cfg, out_dir, progress, dataset, experts, logger)
            return
        self.rank, _ = distributed.check_group(group)  # the same answer on every rank
        with distributed.together(group, self._fingerprint):  # any rank's error: on every rank
            self._build(cfg, out_dir, progress and self.rank == 0, dataset, experts, logger)

    def _build(self, cfg, out_dir, progress, dataset, experts, logger) -> None:
        """Everything the constructor does on one rank (it raises before any collective)."""
        self.out, self.progress = check_output_folder(out_dir), progress
        self.logger = logger if self.rank == 0 else None
        self.device = check_device(cfg.device)
        experts, dataset = checks.experts_and_dataset(cfg, experts, dataset)
        cfg, self.defaults = checks.resolved_config(cfg, experts, dataset)  # chosen, and why
        checks.check_schedule(cfg, experts)
        self.cfg = cfg
        self.experts = [e.to(self.device) for e in experts]
        self.dataset = dataset
        k = dataset.info.num_classes
        self.n = cfg.ipc * k
        if cfg.batch_syn is not None and cfg.batch_syn > self.n:
            raise ValueError(
                f"batch_syn {cfg.batch_syn} is larger than the synthetic set "
                f"(ipc {cfg.ipc} x {k} classes = {self.n} images)"
            )
        self.set_ranks = distributed.SetRanks(self.n, self.group)  # who holds which rows
        if self.group is not None:
            distributed.check_backend(self.group, self.device)
        self.strategy = cfg.strategy
        self.optimizer = sgd(cfg.momentum)
        self.lrs = {"images": cfg.lr_img, "label_logits": cfg.lr_labels, "log_lr": cfg.lr_lr}
        self.model = ConvNet(self.experts[0].config).to(self.device)
        self.beta0 = cfg.lr_init  # resolved: the experts' lr unless given
        self.real_norm = checks.real_images_norm(dataset)  # what the images' norm is warned by
        self.stopped: str | None = None  # why the run stopped early, once it has
        self.dsa = DSA() if cfg.dsa else None
        self.classes = torch.arange(k, device=self.device).repeat_interleave(cfg.ipc)
        if self.set_ranks.shard is not None:
            self.classes = self.classes[self.set_ranks.shard]  # (N_r,) classes of this rank's rows
        self.last_eval: EvalResult | None = None  # the latest evaluation this process made
        self.keep_choice: KeepChoice | None = None  # keep_graphs auto, once chosen
        checkpoint = self.out / CHECKPOINT
        self.state = (
            load_checkpoint(checkpoint, cfg.to_dict(), self.device, self.set_ranks.shard)
            if checkpoint.exists()
            else initial_state(cfg, dataset, self.beta0, self.device, self.set_ranks.shard)
        )
        # log(beta) is kept within log(beta0) -+ log(beta_bound)
        self.log_bounds = checks.beta_log_bounds(cfg, self.beta0, self.state.log_lr.dtype)
        for kind, message in checks.setup_warnings(cfg, experts, dataset):
            self._warn(kind, message)

    def _warn(self, kind: str, message: str) -> None:
        """A warning of this run (rank 0 shows it; every rank keeps it in the state)."""
        warn(kind, message, self.state.warnings, show=self.rank == 0)

    def _fingerprint(self) -> dict[str, str]:
        """What every rank of a run must share (compared by the set-up handshake)."""
        s, info = self.state, self.dataset.info
        last = [torch.cat([p.reshape(-1) for p in e.params[-1].values()]) for e in self.experts]
        return {
            "the config": json.dumps(self.cfg.to_dict(), sort_keys=True),
            "the checkpoint": f"iteration {s.iteration}",
            "the dataset": f"{info.name} {tuple(self.dataset.train_images.shape)} "
                           f"{distributed.checksum(self.dataset.train_labels.double())}",
            "the experts": " ".join(f"{e.epochs}:{distributed.checksum(p)}"
                                    for e, p in zip(self.experts, last)),
            "the generator": str(zlib.crc32(s.generator.get_state().numpy().tobytes())),
            "log(beta)": repr(float(s.log_lr)),
        }

    def _save_checkpoint(self) -> None:
        """The atomic checkpoint. On several ranks rank 0 gathers the shards (one at a time) and
        writes the one-process file, so any number of ranks resumes it; every rank waits for the
        file."""
        s = self.state
        rows = {k: self.set_ranks.to_first(v) for k, v in s.tensors().items() if k in ROW_SHARDED}
        moms = {k: self.set_ranks.to_first(v) for k, v in s.momentum.momentum.items()
                if k in ROW_SHARDED}
        if self.rank == 0:
            whole = dataclasses.replace(
                s, images=rows["images"], label_logits=rows.get("label_logits"),
                momentum=SGDState({**s.momentum.momentum, **moms}),
            )
            save_checkpoint(self.out / CHECKPOINT, self.cfg.to_dict(), whole)
        self.set_ranks.barrier()

    # -- labels ---------------------------------------------------------------------------------

    def labels(self, expert: ExpertTrajectory, target_epoch: int, *, saved: bool = False):
        """The strategy's labels for the current images: the ones an iteration matching up to
        ``target_epoch`` of ``expert`` trains on, or (``saved``) the ones the set is saved with."""
        s, strategy = self.state, self.strategy
        teacher = None
        if strategy.teacher_epoch is not None:
            epoch = strategy.teacher_epoch(target_epoch, expert.epochs)
            teacher = teacher_logits(self.model, expert.params[epoch], s.images)
        inputs = LabelInputs(self.classes, s.label_logits, teacher)
        return strategy.saved_labels(inputs) if saved else strategy.train_labels(inputs)

    def final_labels(self):
        """Labels the evaluation trains with. A teacher is expert 0 at the latest target epoch any
        iteration could match (``max_start_epoch - 1 + match_epochs``), or as the strategy says."""
        cfg = self.cfg
        return self.labels(self.experts[0], cfg.max_start_epoch - 1 + cfg.match_epochs,
                           saved=True)

    # -- the loop -------------------------------------------------------------------------------

    def step(self) -> None:
        """One iteration of Algorithm 1 (updates self.state)."""
        cfg, s = self.cfg, self.state
        tic = time.perf_counter()
        e = int(torch.randint(len(self.experts), (1,), generator=s.generator))
        t = int(torch.randint(cfg.max_start_epoch, (1,), generator=s.generator))
        expert, target_epoch = self.experts[e], t + cfg.match_epochs
        batch = cfg.batch_syn or self.n
        batches, s.order = draw_minibatches(s.order, self.n, batch, cfg.syn_steps, s.generator)
        augment = None
        if self.dsa is not None:
            augment = self.dsa.replayable([batch] * cfg.syn_steps, s.generator,
                                          device=self.device, dtype=s.images.dtype)
        # this rank's rows of the minibatches every rank drew (one process: all of them)
        batches, augment = self.set_ranks.local_minibatches(batches, augment)
        beta = s.log_lr.exp()
        labels = self.labels(expert, target_epoch)
        drift, counts = label_drift(labels, self.classes, self.dataset.info.num_classes)
        if self.group is not None:  # over every rank's rows: mismatches and counts add up
            summed = self.set_ranks.sum([float(drift) * len(self.classes), *counts.tolist()])
            drift, counts = summed[0] / self.n, torch.tensor(summed[1:], dtype=torch.float64)
        res = match_trajectory(
            self.model, expert.params[t], expert.params[target_epoch], s.images,
            labels, beta, _on_device(batches, self.device),
            method=cfg.method, augment=augment, state_stride=cfg.state_stride,
            keep_graphs=self.keep_graphs(), microbatch_size=cfg.microbatch_size, group=self.group,
        )
        lr_grad = res.beta_grad * beta  # dL/dlog(beta)
        grads = {"images": res.images_grad, "label_logits": res.labels_grad, "log_lr": lr_grad}
        checked = [res.loss, res.images_grad, lr_grad]
        if self.strategy.learns_logits:
            checked.append(res.labels_grad)
        finite = self.set_ranks.all_true(_all_finite(checked))
        if finite:
            if math.isfinite(cfg.lr_grad_clip):
                grads["log_lr"] = lr_grad.clamp(-cfg.lr_grad_clip, cfg.lr_grad_clip)
            learned = s.learned(self.strategy)
            learned, momentum = self.optimizer.update(
                learned, {k: grads[k] for k in learned}, s.momentum, self.lrs
            )
            if self.log_bounds is not None:
                learned["log_lr"] = learned["log_lr"].clamp(*self.log_bounds)
            # beta 0 or inf would stop the next iteration: log(exp(log_lr)) is finite only for
            # a beta that is finite and > 0 in floating point (one read for all the checks)
            new_log_beta = learned["log_lr"].exp().log()
            finite = self.set_ranks.all_true(_all_finite([*learned.values(), new_log_beta]))
        if finite:  # commit only a finite update: inf images would stop the next iteration
            s.momentum = momentum
            s.images = learned.get("images", s.images)
            s.label_logits = learned.get("label_logits", s.label_logits)
            s.log_lr = learned["log_lr"]
        else:
            s.skipped += 1
        s.iteration += 1
        nan = float("nan")
        labels_norm = self.set_ranks.norm(res.labels_grad) if self.strategy.learns_logits else nan
        images_norm = self.set_ranks.norm(s.images) / self.n ** 0.5  # RMS over all N images
        for name, value in zip(LOG_FIELDS, (
            float(res.loss), float(s.log_lr.exp()), self.set_ranks.norm(res.images_grad),
            labels_norm, float(lr_grad.abs()), float(not finite), float(e), float(t),
            time.perf_counter() - tic, float(drift), images_norm,
        )):
            s.log[name].append(value)
        s.log["class_count"].append(counts.tolist())
        for kind, message in checks.iteration_warnings(
                cfg, s, beta0=self.beta0, real_norm=self.real_norm, class_counts=counts,
                has_teacher=self.strategy.teacher_epoch is not None):
            self._warn(kind, message)
        self.stopped = checks.stop_reason(cfg, s, beta0=self.beta0, log_bounds=self.log_bounds)

    def keep_graphs(self) -> int:
        """The k every matching call of this run keeps: the config's, or for "auto" the one chosen
        at the first call (:func:`tesla_func.planner.auto.choose_keep_graphs`: the largest k whose
        iteration fits the device's free memory or ``memory_budget``; on several ranks, the
        smallest of their choices)."""
        cfg = self.cfg
        if cfg.keep_graphs != "auto":
            return cfg.keep_graphs
        if self.keep_choice is None:
            _, channels, side, _ = self.state.images.shape
            k = self.dataset.info.num_classes
            run = RunShape(distill=cfg, shape=DatasetShape(channels, side, k, 0), model=self.model,
                           num_images=self.n, torch_dtype=self.state.images.dtype)
            choice = choose_keep_graphs(run, cfg.method, cfg.syn_steps, self.device,
                                        memory_budget=cfg.memory_budget)
            if self.group is not None:  # every rank must call with the same k
                keep = int(-distributed.max_float(self.group, -choice.keep))
                choice = dataclasses.replace(choice, keep=keep)
            self.keep_choice = choice
        return self.keep_choice.keep

    def synthetic_set(self) -> SyntheticSet:
        """The whole set (on several ranks: gathered, on every rank; every rank must call it)."""
        s = self.state
        header = {
            "config": self.cfg.to_dict(),
            "iteration": s.iteration,
            "skipped_updates": s.skipped,
            "dataset_info": self.dataset.info.to_dict(),
            "architecture": self.experts[0].config.to_dict(),
            "provenance": provenance(self.device),
            "defaults": self.defaults,  # the fields the dataset's defaults set, and why
            "warnings": list(s.warnings.values()),
            "stopped": self.stopped,  # why the run stopped early (None: it did not)
        }
        return SyntheticSet(
            self.set_ranks.whole(s.images).cpu(),
            self.set_ranks.whole(self.final_labels()).cpu(),
            float(s.log_lr.exp()),
            None if s.label_logits is None else self.set_ranks.whole(s.label_logits).cpu(),
            header,
        )

    def protocol(self, lr: float, arch: str = "convnet", **arch_kwargs: Any) -> EvalConfig:
        """The evaluation protocol of this run (docs/reference.md section 6, with the config's
        eval_epochs and eval_models); ``arch="convnet"`` is the experts' own architecture."""
        if arch == "convnet" and not arch_kwargs:
            c = self.experts[0].config
            arch_kwargs = {"width": c.width, "depth": c.depth, "norm": c.norm}
        return EvalConfig(arch=arch, arch_kwargs=arch_kwargs, epochs=self.cfg.eval_epochs, lr=lr,
                          num_models=self.cfg.eval_models, seed=self.cfg.seed,
                          device=self.cfg.device, progress=False)

    def evaluate(
        self, synthetic: SyntheticSet | None = None, protocol: EvalConfig | None = None
    ) -> EvalResult:
        """Train fresh networks on the synthetic set (with its learned lr); test them on the
        validation split and the test set."""
        synthetic = synthetic or self.synthetic_set()
        protocol = protocol or self.protocol(lr=synthetic.lr)
        data = self.dataset
        return evaluate(synthetic.images, synthetic.labels, data.test_images, data.test_labels,
                        protocol, DSA() if self.cfg.dsa else None,
                        num_classes=data.info.num_classes, val_images=data.val_images,
                        val_labels=data.val_labels, group=self.group)

    def _record_eval(self) -> None:
        result = self.last_eval = self.evaluate()
        s = self.state
        values = (s.iteration, result.mean, result.std, result.val_mean, result.val_std)
        for name, value in zip(EVAL_FIELDS, values):
            s.evals[name].append(float(value))
        if self.rank == 0:
            tqdm.write(f"iteration {s.iteration}: validation accuracy "
                       f"{100 * result.val_mean:.2f} %, test accuracy {result}")
        if self.logger is not None:
            self.logger.scalars("eval", s.iteration, result.scalars())

    def _log_iteration(self) -> None:
        """The last iteration's log entries (and the skipped updates so far) to the logger."""
        if self.logger is not None:
            s = self.state
            values = {"beta" if k == "lr" else k: s.log[k][-1] for k in LOG_FIELDS}
            self.logger.scalars("distill", s.iteration, {**values, "skipped_updates": s.skipped})

    def _log_set(self, synthetic: SyntheticSet) -> None:
        """The set's image grid to the logger, at the current iteration."""
        if self.logger is not None:
            from tesla_func.plots import set_grid  # where used: plots import seaborn (1-2 s)

            self.logger.image("distill/synthetic_set", self.state.iteration,
                              set_grid(synthetic, dataset=self.dataset))

    def log_results(self):
        """The per-iteration log and the evaluations as one xarray Dataset."""
        # where used: xarray and pandas cost 0.6 s at start-up, which every importer of
        # DistillConfig's module (the CLI's flags, `tesla-func --help`) would pay
        from tesla_func.results import make_results

        s, cfg = self.state, self.cfg
        data = {name: (("iteration",), np.asarray(s.log[name], dtype=np.float64))
                for name in LOG_FIELDS}
        k = self.dataset.info.num_classes
        for name in CLASS_LOG_FIELDS:
            data[name] = (("iteration", "class"),
                          np.asarray(s.log[name], dtype=np.float64).reshape(-1, k))
        data["label_drift"] = (*data["label_drift"], {"units": "fraction"})
        for name in EVAL_FIELDS[1:]:
            data[f"eval_{name}"] = (("eval_iteration",), np.asarray(s.evals[name]))
        coords = {
            "iteration": np.arange(1, len(s.log["loss"]) + 1),
            "eval_iteration": np.asarray(s.evals["iteration"], dtype=np.int64),
            "class": np.arange(k),
            "class_name": (("class",), list(self.dataset.info.class_names)),
        }
        keep = ({"keep_graphs": cfg.keep_graphs, "keep_graphs_requested": cfg.keep_graphs}
                if self.keep_choice is None else self.keep_choice.attrs())
        return make_results(data, coords, config=cfg, seed=cfg.seed, device=cfg.device,
                            skipped_updates=s.skipped, method=cfg.method,
                            label_strategy=cfg.label_strategy, ipc=cfg.ipc,
                            defaults=self.defaults, warnings=list(s.warnings.values()),
                            stopped=self.stopped or "", **keep)

    def snapshot(self) -> Path:
        """Write the set as it is now to ``snapshot_path(out_dir, iteration)`` (atomically)."""
        path = snapshot_path(self.out, self.state.iteration)
        synthetic = self.synthetic_set()  # gathered on every rank; rank 0 writes it
        if self.rank == 0:
            synthetic.save(path)
            self._log_set(synthetic)
        return path

    def run(self, stop_after: int | None = None) -> SyntheticSet:
        """Run (or resume) to ``cfg.iterations``; ``stop_after`` stops early (tests of resume).

        Writes ``out_dir/checkpoint.safetensors`` every ``save_every`` iterations, the snapshots
        of ``snapshot_every`` and, at the end, ``out_dir/synthetic.safetensors``, its picture
        ``out_dir/synthetic.png`` (:func:`tesla_func.plots.plot_synthetic`) and
        ``out_dir/log.nc`` (on several ranks: rank 0 writes, and every rank returns the whole
        set). A resumed run rewrites the snapshots after its checkpoint with the same bits. The
        config is in ``out_dir/config.toml`` from the start (``tesla-func distill --config`` reads
        it: :mod:`tesla_func.configfile`).
        """
        cfg, s = self.cfg, self.state
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            write_config_toml(self.out / CONFIG_TOML, cfg.to_dict(), comment=(
                "tesla_func DistillConfig of this run; it distils again with\n"
                "tesla-func distill --config config.toml --out DIR"))
        last = cfg.iterations if stop_after is None else min(cfg.iterations, stop_after)
        if cfg.snapshot_every and s.iteration == 0:
            self.snapshot()
        keep = self.keep_graphs()
        if self.keep_choice is not None and self.progress:
            tqdm.write(self.keep_choice.describe())
        bar = tqdm(total=cfg.iterations, initial=s.iteration, unit="it",
                   desc=f"distill {cfg.method}/{cfg.label_strategy} ipc{cfg.ipc} k{keep}",
                   disable=not self.progress)
        while s.iteration < last:
            self.step()
            self._log_iteration()
            bar.update(1)
            bar.set_postfix(loss=f"{s.log['loss'][-1]:.4f}", lr=f"{s.log['lr'][-1]:.2e}",
                            skipped=s.skipped)
            if self.stopped is not None:
                break
            if (cfg.eval_every and s.iteration % cfg.eval_every == 0
                    and s.iteration < cfg.iterations):
                self._record_eval()
            if cfg.snapshot_every and (s.iteration % cfg.snapshot_every == 0
                                       or s.iteration == cfg.iterations):
                self.snapshot()
            if s.iteration % cfg.save_every == 0 or s.iteration == last:
                self._save_checkpoint()
        bar.close()
        synthetic = self.synthetic_set()
        if self.stopped is not None:  # the last good set, its log and the state it stopped in
            self._save_checkpoint()
            self._write_outputs(synthetic)
            raise DistillationStopped(f"{self.stopped}. The set as it was then is in "
                                      f"{self.out / 'synthetic.safetensors'}")
        if s.iteration >= cfg.iterations:
            if not s.evals["iteration"] or s.evals["iteration"][-1] != s.iteration:
                self._record_eval()
                self._save_checkpoint()
            self._write_outputs(synthetic)
        return synthetic

    def _write_outputs(self, synthetic: SyntheticSet) -> None:
        """``synthetic.safetensors``, ``log.nc`` and ``synthetic.png`` (rank 0 writes; every
        rank returns once the files are there)."""
        # where used: seaborn and matplotlib (through plots) and xarray cost 2 s at start-up
        from tesla_func.plots import plot_synthetic
        from tesla_func.results import save_results

        if self.rank == 0:
            synthetic.save(self.out / "synthetic.safetensors")
            save_results(self.log_results(), self.out / "log.nc")
            plot_synthetic(synthetic, self.out / "synthetic.png", dataset=self.dataset)
            if not self.cfg.snapshot_every:  # (a snapshot has logged the final set already)
                self._log_set(synthetic)
        self.set_ranks.barrier()


def _all_finite(tensors) -> bool:
    """Whether every entry of every tensor is finite, in one read of the device."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _on_device(batches: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The T index batches on ``device`` in one copy (one host-to-device copy waits for the
    queued kernels on CUDA: T of them otherwise)."""
    if all(b.device == device for b in batches):
        return list(batches)
    return list(torch.cat(batches).to(device).split([len(b) for b in batches]))


def distill(cfg: DistillConfig, out_dir: str | Path, **kwargs: Any) -> SyntheticSet:
    """Run (or resume) a distillation into ``out_dir``: see :class:`Distiller`."""
    return Distiller(cfg, out_dir, **kwargs).run()
