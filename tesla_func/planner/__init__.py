"""Plan a distillation before running it: predicted peak memory and FLOPs of each gradient method,
and what else one distillation iteration holds, for any dataset, model and size, on a CPU.

    from tesla_func.planner import PlanConfig, plan, plan_markdown
    ds = plan(PlanConfig(dataset="imagenet64", model="convnetd4", ipc=1, batch_syn=100,
                         syn_steps=(50,), device_memory="48GB"))
    print(plan_markdown(ds))

    tesla-func plan --dataset imagenet64 --model convnetd4 --ipc 1 --batch-syn 100 --syn-steps 50 \\
        --device-memory 48GB

    run = DistillConfig(dataset="cifar10", ipc=50, syn_steps=30, microbatch_size=64)
    plan(PlanConfig(run, syn_steps=(run.syn_steps,), methods=(run.method,)))   # this very run

**What is planned.** A plan is a distillation run (:class:`~tesla_func.distill_config.
DistillConfig`) and what only planning needs (:class:`PlanConfig`, :mod:`.config`): the run's
fields that change memory (dataset, ipc, batch_syn, syn_steps, method, label_strategy, dsa,
state_stride, microbatch_size, keep_graphs) and the seed of its DSA draws are read, and
``tesla-func plan`` takes them by the flags of ``tesla-func distill``. Two are swept: the plan
predicts every T of ``--syn-steps`` (several values) for every method of ``--method`` (or
``--methods``; several values). The network is given (``--model``, ``--width``, ``--depth``):
a plan reads no experts.

Every number comes from the library's own code run on tensors that have shapes but no data
(:func:`tesla_func.memory.predict_cost`): :func:`~tesla_func.matching.match_trajectory` on the
planned model skeleton, with the planned shapes and dtype. Nothing of the planned size is
allocated. Dataset shapes come from :func:`tesla_func.data.shape` (no files are read).

One iteration of the distillation (tesla_func.distill) holds on its device:

==================  ================================================================================
held                the synthetic images and their SGD momentum; the labels (int classes; SLA: the
                    teacher's (N, K) logits; learned: logits and their momentum); the expert
                    checkpoints in use (start, target); the model skeleton's own parameters and
                    buffers; optionally further expert checkpoints (``experts_on_device``); the
                    step index batches and the DSA draws of the iteration (these grow with T)
matching call       the predicted peak of ``match_trajectory`` above its inputs (it includes the
                    gradients the call returns)
SGD update          the returned gradients + 3 copies of the largest updated tensor (the new
                    momentum, lr * momentum and the new value, before the old ones are freed)
SLA teacher         one forward without a graph of the teacher on all N images (SLA strategies),
                    above its output (the labels)
==================  ================================================================================

    iteration peak = held + max(matching call, SGD update, SLA teacher)

**Microbatches.** The run's ``microbatch_size`` goes into every predicted call, as the
distillation passes it: ``tesla`` and ``exact`` then hold about one chunk's graph at a time.

**DSA.** Every call of the distillation draws one augmentation family per student step at random.
The plan gives every step the family whose step costs the most memory (found by predicting one
step of each family), so the prediction bounds every iteration's draw from above.

**Long trajectories.** Predicting a call costs about a millisecond per operator, so for T above
``extrapolate_above`` the matching call is predicted at two short T (3 and 4 steps; for ``exact``
with ``state_stride`` k, two T past the first k steps with the residue of T modulo k) and extended
linearly: every step of a call runs the same operators on the same shapes, so peak bytes and FLOPs
are affine in T from T = 3 on. Tests check the extension against direct prediction. A limit found
by linearity (the largest T that fits) is checked by a direct prediction at the limit when it is at
most ``verify_max_steps``.

**Spending the memory a device has.** ``tesla`` and ``exact`` pay for their constant memory with
one extra forward and backward per step (the rebuild); ``keep_graphs = k`` keeps the last k step
graphs of the first pass instead, one step graph of memory per rebuild saved (k = T: ``exact``
does the work of ``unrolled`` and holds its memory). With ``device_memory``, the plan gives for
each of them and each planned T the largest k whose iteration fits, with its peak and FLOPs. The
peak is linear in k from k = 2 on (k = 1 is the call of k = 0), or from k = 1 on where the run's
microbatches split a step, at every T, so k is read off a line (:meth:`Predictor.keep_line`: the
call at k = 0 and three short calls). For T up to
``verify_keep_max_steps`` it is then checked by predicting the whole T-step call at k (it fits)
and at k + 1 (it does not). Above, that check would cost two calls of T steps per method (about
25 s each for a ConvNetD4 on ImageNet at T = 50), so k is the line's, marked as an estimate; tests
check the line against direct prediction.

**A run that picks its own k** (``keep_graphs="auto"``, the distillation's default):
:func:`choose_keep_graphs` (:mod:`.auto`) reads the same line, measured once per run shape on the
run's device, against the memory free there (or ``memory_budget``).
"""

from tesla_func.matching import KEEP_METHODS  # noqa: F401 (re-exported)
from tesla_func.memory import format_bytes, parse_bytes  # noqa: F401 (re-exported: their old home)
from tesla_func.planner.auto import (
    MEMORY_FRACTION,
    KeepChoice,
    RunShape,
    choose_keep_graphs,
    free_memory,
)
from tesla_func.planner.config import (
    DTYPES,
    LIMITS,
    PLANNED_FIELDS,
    SWEPT_FIELDS,
    UNPLANNED_FIELDS,
    PlanConfig,
)
from tesla_func.planner.limits import ANY, KeepLimit, Limits
from tesla_func.planner.planning import plan
from tesla_func.planner.predictor import (
    KeepLine,
    LabelKind,
    Predictor,
    held_bytes,
    label_kind,
    teacher_peak_bytes,
    update_peak_bytes,
)
from tesla_func.planner.report import plan_markdown, plan_records

NONE = None  # KeepLimit.keep where not even keep_graphs = 0 fits (an alias kept for one release)

__all__ = [
    "ANY", "DTYPES", "KEEP_METHODS", "LIMITS", "MEMORY_FRACTION", "NONE", "PLANNED_FIELDS",
    "SWEPT_FIELDS", "UNPLANNED_FIELDS", "KeepChoice", "KeepLimit", "KeepLine", "LabelKind",
    "Limits", "PlanConfig", "Predictor", "RunShape", "choose_keep_graphs", "format_bytes",
    "free_memory", "held_bytes", "label_kind", "parse_bytes", "plan", "plan_markdown",
    "plan_records", "teacher_peak_bytes", "update_peak_bytes",
]
