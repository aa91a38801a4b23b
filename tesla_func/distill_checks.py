"""What a distillation checks before it starts and after each iteration.

Before: the experts (given, or loaded from ``cfg.experts_dir``) and the dataset they recorded
(:func:`experts_and_dataset`), the config resolved from both (:func:`resolved_config`), and a
schedule whose start and target epochs every expert has (:func:`check_schedule`).

Results that cannot be good are warned of, once each (:func:`tesla_func.runchecks.warn`, by
:class:`tesla_func.distill.Distiller`): experts at chance or a student longer than its expert's
steps (:func:`setup_warnings`); beta 100x from its start, images 10x the real images' norm, a
teacher labelling fewer than half the classes (:func:`iteration_warnings`). A run that cannot go
on stops, with the cause and the flag to change (:func:`stop_reason`): beta at a bound of
``beta_bound``, or ``max_skipped`` skipped updates.

Each function returns its findings; the Distiller keeps them in the run's state, header and log.
"""

from __future__ import annotations

import math

import torch

from tesla_func.data import Dataset, check_same_dataset, expert_steps, load_dataset_like
from tesla_func.distill_config import DistillConfig
from tesla_func.distill_state import DistillState
from tesla_func.experts import ExpertTrajectory, chance_warning, load_experts

BETA_WARN_FACTOR = 100.0  # beta this many times below or above beta0 is warned of
NORM_WARN_FACTOR = 10.0  # images whose RMS norm is this many times the real images' are too
REAL_NORM_IMAGES = 1000  # about this many real training images (evenly spaced) give the norm

Finding = tuple[str, str]  # (kind, message) of a warning: one of each kind per run


def experts_and_dataset(
    cfg: DistillConfig, experts: list[ExpertTrajectory] | None, dataset: Dataset | None
) -> tuple[list[ExpertTrajectory], Dataset]:
    """The experts (given, or loaded from ``cfg.experts_dir``) and the dataset they were trained
    on, as their header recorded it (ZCA, validation split, image size, class names, and for
    "folder" the root): given and checked against the record, or reloaded from it."""
    if experts is None:
        if cfg.experts_dir is None:
            raise ValueError("DistillConfig.experts_dir is required: the folder of "
                             "expert_*.safetensors that `tesla-func experts` wrote")
        experts = load_experts(cfg.experts_dir)
    check_experts(cfg, experts)
    name = experts[0].dataset
    recorded = {**experts[0].header.get("dataset_info", {}), "name": name}
    what = f"the experts in {cfg.experts_dir}" if cfg.experts_dir else "the experts"
    if dataset is None:
        dataset = load_dataset_like(recorded, cfg.data_root, what=what)
    if dataset.info.name != name:
        raise ValueError(f"dataset {dataset.info.name!r} is not the experts' {name!r}")
    check_same_dataset(recorded, dataset.info, what)
    return experts, dataset


def check_experts(cfg: DistillConfig, experts: list[ExpertTrajectory]) -> None:
    """At least one expert, of the dataset the config names (if it names one)."""
    if not experts:
        raise ValueError(f"no experts to match in {cfg.experts_dir}")
    dataset = experts[0].dataset
    if cfg.dataset is not None and dataset != cfg.dataset:
        raise ValueError(
            f"the experts in {cfg.experts_dir} were trained on {dataset!r}, "
            f"but the config distils {cfg.dataset!r}"
        )


def resolved_config(cfg: DistillConfig, experts: list[ExpertTrajectory], dataset: Dataset
                    ) -> tuple[DistillConfig, dict[str, str]]:
    """``cfg`` with the dataset's defaults for these experts (:meth:`DistillConfig.resolved`),
    and the record of what was chosen and why."""
    first = experts[0]
    return cfg.resolved(
        dataset.info, train_size=len(dataset.train_labels), expert_lr=first.lr,
        expert_epochs=min(e.epochs for e in experts),
        expert_batch_size=first.batch_size,
    )


def check_schedule(cfg: DistillConfig, experts: list[ExpertTrajectory]) -> None:
    """The (resolved) start and target epochs must exist in every expert:
    ``max_start_epoch - 1 + match_epochs <= min_e E_e``."""
    last_needed = cfg.max_start_epoch - 1 + cfg.match_epochs
    shortest = min(e.epochs for e in experts)
    if last_needed > shortest:
        raise ValueError(
            f"max_start_epoch {cfg.max_start_epoch} with match_epochs {cfg.match_epochs} needs "
            f"checkpoints up to epoch {last_needed}, but the experts in {cfg.experts_dir} have "
            f"{shortest} epochs: lower --max-start-epoch or --match-epochs, or train longer "
            "experts"
        )


def real_images_norm(dataset: Dataset) -> float:
    """The RMS over images of the L2 norm of a real training image (about REAL_NORM_IMAGES
    evenly spaced ones): what the synthetic images' norm is compared with."""
    real = dataset.train_images
    return rms_norm(real[::max(1, len(real) // REAL_NORM_IMAGES)])


def rms_norm(images: torch.Tensor) -> float:
    """sqrt(mean_i ||x_i||^2) over the images ``images`` (N, ...)."""
    return float(images.flatten(1).norm(dim=1).square().mean().sqrt())


def setup_warnings(cfg: DistillConfig, experts: list[ExpertTrajectory], dataset: Dataset
                   ) -> list[Finding]:
    """What the experts and the config already say: experts at chance, and a student longer
    than its expert's steps in ``match_epochs``."""
    found, k = [], dataset.info.num_classes
    weak = [i for i, e in enumerate(experts)
            if chance_warning("", e.test_accuracy[-1], e.epochs, k) is not None]
    if weak:
        e = experts[weak[0]]
        what = f"expert {weak[0]}" + (f" (and {len(weak) - 1} more)" if len(weak) > 1 else "")
        found.append(("experts", chance_warning(what, e.test_accuracy[-1], e.epochs, k)))
    steps = expert_steps(cfg.match_epochs, len(dataset.train_labels), experts[0].batch_size)
    if cfg.syn_steps > steps:
        found.append(("syn_steps", f"syn_steps {cfg.syn_steps} is longer than the {steps} SGD "
                      f"steps an expert took in match_epochs {cfg.match_epochs}: the student "
                      f"overshoots its target; use --syn-steps {steps} or fewer, or a larger "
                      "--match-epochs"))
    return found


def iteration_warnings(cfg: DistillConfig, state: DistillState, *, beta0: float,
                       real_norm: float, class_counts: torch.Tensor, has_teacher: bool
                       ) -> list[Finding]:
    """What the iteration just logged in ``state`` says: beta 100x from ``beta0``, images 10x
    ``real_norm``, a teacher whose labels (``class_counts`` (K,): images per label) cover fewer
    than half the K classes."""
    found, log = [], state.log
    beta, norm = log["lr"][-1], log["images_norm"][-1]
    where = f"at iteration {state.iteration}"
    if beta < beta0 / BETA_WARN_FACTOR:
        found.append(("beta", f"beta fell from {beta0:.3g} to {beta:.3g} {where}: the student "
                      "barely trains and neither do the images; lower --lr-lr "
                      f"(now {cfg.lr_lr:g}) or --lr-img (now {cfg.lr_img:g}), or shorten "
                      f"--syn-steps (now {cfg.syn_steps})"))
    elif beta > beta0 * BETA_WARN_FACTOR:
        found.append(("beta", f"beta rose from {beta0:.3g} to {beta:.3g} {where}: the sets' "
                      f"networks will train at this lr; lower --lr-lr (now {cfg.lr_lr:g}) or "
                      f"--lr-grad-clip (now {cfg.lr_grad_clip})"))
    if norm > NORM_WARN_FACTOR * real_norm:
        found.append(("images_norm", f"the images' norm grew to {norm:.4g} {where} (real "
                      f"images: {real_norm:.3g}): they no longer look like data; lower "
                      f"--lr-img (now {cfg.lr_img:g})"))
    present, k = int((class_counts > 0).sum()), len(class_counts)
    if has_teacher and present < k / 2:
        found.append(("labels", f"the teacher labels the images with only {present} of {k} "
                      f"classes {where} (label drift {log['label_drift'][-1]:.2f}): its "
                      "checkpoints are too weak a teacher; use --label-strategy hard, or "
                      "experts trained longer"))
    return found


def beta_log_bounds(cfg: DistillConfig, beta0: float, dtype: torch.dtype
                    ) -> tuple[float, float] | None:
    """log(beta0) -+ log(beta_bound), rounded to ``dtype`` (so that a clipped log beta equals
    its bound); None for no bound (beta_bound inf)."""
    if math.isinf(cfg.beta_bound):
        return None
    return tuple(float(torch.tensor(math.log(beta0) + sign * math.log(cfg.beta_bound),
                                    dtype=dtype)) for sign in (-1, 1))


def stop_reason(cfg: DistillConfig, state: DistillState, *, beta0: float,
                log_bounds: tuple[float, float] | None) -> str | None:
    """Why the run cannot go on (beta at a bound, ``max_skipped`` skipped updates), with the
    flag to change; None while it can."""
    if cfg.max_skipped and state.skipped >= cfg.max_skipped:
        return (f"{state.skipped} updates were skipped by iteration {state.iteration} for a "
                "non-finite loss, gradient or update: lower --lr-img (now "
                f"{cfg.lr_img:g}) or --lr-lr (now {cfg.lr_lr:g}), or raise --max-skipped "
                f"(now {cfg.max_skipped}; the same --out then resumes)")
    if log_bounds is None:
        return None
    log_beta, (low, high) = float(state.log_lr), log_bounds
    if low < log_beta < high:
        return None
    side, verb = ("lower", "fell") if log_beta <= low else ("upper", "rose")
    return (f"beta {verb} to its {side} bound {math.exp(log_beta):.3g} (beta0 "
            f"{beta0:.3g}, beta_bound {cfg.beta_bound:g}) at iteration {state.iteration}: "
            f"lower --lr-lr (now {cfg.lr_lr:g}) or --lr-img (now {cfg.lr_img:g}), or "
            f"shorten --syn-steps (now {cfg.syn_steps}); or allow more with --beta-bound; "
            "in a new --out folder")
