"""Distillation (Algorithm 1): label strategies, the non-finite guard, bitwise resume, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tesla_func.distill as distill_module
from tesla_func.data import load_dataset
from tesla_func.distill import DistillConfig, Distiller
from tesla_func.experts import ExpertConfig, load_experts, train_experts
from tesla_func.fileio import load_tensors, save_tensors
from tesla_func.labels import LABEL_STRATEGIES, LabelStrategy
from tesla_func.matching import MatchResult
from tesla_func.models import ConvNet
from tesla_func.results import load_results
from tesla_func.runchecks import RunWarning
from tesla_func.synthetic import load_synthetic


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("experts")
    train_experts(
        ExpertConfig(dataset="digits", num_experts=2, epochs=3, width=8, seed=0, dsa=False),
        out,
        dataset=digits,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def experts(experts_dir):
    return load_experts(experts_dir)


def config(experts_dir, **changes):
    base = DistillConfig(
        experts_dir=str(experts_dir),
        ipc=2,
        iterations=4,
        syn_steps=3,
        match_epochs=1,
        max_start_epoch=2,
        batch_syn=10,
        eval_epochs=3,
        eval_models=1,
        save_every=2,
        dsa=True,
    )
    return dataclasses.replace(base, **changes)


def make(cfg, out, digits, experts):
    return Distiller(cfg, out, progress=False, dataset=digits, experts=experts)


def _runs_end_to_end(tmp_path, experts_dir, digits, experts, name):
    """Distil with strategy ``name``; check what the strategy says it does is what happened."""
    strategy = LABEL_STRATEGIES[name]
    cfg = config(experts_dir, label_strategy=name)
    distiller = make(cfg, tmp_path, digits, experts)
    initial = distiller.state.tensors()
    synthetic = distiller.run()
    n, k = 20, 10
    assert synthetic.images.shape == (n, 1, 8, 8)
    if synthetic.labels.dim() == 1:
        assert torch.equal(synthetic.labels, torch.arange(k).repeat_interleave(2))
    else:
        assert synthetic.labels.shape == (n, k)
        torch.testing.assert_close(synthetic.labels.sum(1), torch.ones(n))
    assert (synthetic.label_logits is not None) == strategy.learns_logits
    if strategy.learns_logits:
        assert not torch.equal(synthetic.label_logits, initial["label_logits"])
    changed = not torch.equal(synthetic.images, initial["images"])
    assert changed == strategy.learns_images
    assert synthetic.lr > 0 and synthetic.lr != distiller.beta0
    loaded = load_synthetic(tmp_path / "synthetic.safetensors")
    assert torch.equal(loaded.images, synthetic.images)
    assert torch.equal(loaded.labels, synthetic.labels)
    assert loaded.header["config"]["label_strategy"] == name
    log = load_results(tmp_path / "log.nc")
    assert log.sizes["iteration"] == 4 and log.attrs["config"]["label_strategy"] == name
    assert len(log["eval_accuracy_mean"]) == 1
    return synthetic


@pytest.mark.parametrize("name", sorted(LABEL_STRATEGIES))
def test_every_label_strategy_runs_and_writes_outputs(
    tmp_path, experts_dir, digits, experts, name
):
    _runs_end_to_end(tmp_path, experts_dir, digits, experts, name)


def test_a_new_strategy_is_one_registry_entry(tmp_path, experts_dir, digits, experts,
                                              monkeypatch):
    # A sixth strategy, defined here only: fixed label smoothing (0.8 on the class). Nothing
    # outside this entry knows it, yet the config accepts it and distillation runs it.
    smoothing = lambda inputs: torch.log(  # noqa: E731
        0.8 * torch.nn.functional.one_hot(inputs.classes, 10) + 0.2 / 10
    )
    toy = LabelStrategy(
        "label smoothing 0.2, fixed",
        train_labels=smoothing,
        saved_labels=lambda inputs: torch.softmax(smoothing(inputs), -1),
    )
    monkeypatch.setitem(LABEL_STRATEGIES, "smoothed", toy)
    synthetic = _runs_end_to_end(tmp_path, experts_dir, digits, experts, "smoothed")
    expected = 0.8 * torch.nn.functional.one_hot(torch.arange(10).repeat_interleave(2), 10) + 0.02
    torch.testing.assert_close(synthetic.labels, expected.float())


def test_learned_logits_start_near_one_hot(tmp_path, experts_dir, digits, experts):
    distiller = make(
        config(experts_dir, label_strategy="learned", label_init_confidence=0.8), tmp_path,
        digits, experts
    )
    probs = torch.softmax(distiller.state.label_logits, -1)
    torch.testing.assert_close(probs.max(1).values, torch.full((20,), 0.8))
    assert torch.equal(probs.argmax(1), torch.arange(10).repeat_interleave(2))


class _ModeShowingConvNet(ConvNet):
    """The experts' ConvNet with every logit raised by 1 in train mode: a shift that no softmax
    and no cross-entropy sees, but that shows in the logits in which mode a call ran."""

    def forward(self, x):
        return super().forward(x) + float(self.training)


@pytest.mark.parametrize("name", ["sla", "sla-last", "sla-only"])
def test_sla_teacher_is_the_right_checkpoint_in_eval_mode_on_raw_images(
    tmp_path, experts_dir, digits, experts, monkeypatch, name
):
    """docs/reference.md section 4: the teacher is the expert at the iteration's target epoch
    (``sla-last``: its last epoch), in eval mode, on the un-augmented images (DSA is on). Each
    checkpoint of each expert gives other logits, so the labels name the one they came from."""
    seen = []
    real = distill_module.match_trajectory

    def spy(model, start, target, images, labels, *args, **kwargs):
        seen.append((target, images.clone(), labels.clone()))
        return real(model, start, target, images, labels, *args, **kwargs)

    monkeypatch.setattr(distill_module, "match_trajectory", spy)
    cfg = config(experts_dir, label_strategy=name)
    assert cfg.dsa
    distiller = make(cfg, tmp_path, digits, experts)
    distiller.model = _ModeShowingConvNet(distiller.experts[0].config)
    for _ in range(3):
        distiller.step()
    assert distiller.model.training  # the student steps run in train mode: the mode is restored

    plain = ConvNet(distiller.experts[0].config).eval()

    def teacher(params, images):
        with torch.no_grad():
            return torch.func.functional_call(plain, params, (images,))

    checkpoints = [(e, j) for e, ex in enumerate(distiller.experts) for j in range(ex.epochs + 1)]
    for target, images, labels in seen:
        (e, target_epoch), = [
            (e, j) for e, j in checkpoints if distiller.experts[e].params[j] is target
        ]
        epoch = distiller.experts[e].epochs if name == "sla-last" else target_epoch
        assert epoch != target_epoch or name != "sla-last"  # the two rules are told apart
        # Raw images, eval mode, that checkpoint of that expert: and no other checkpoint.
        agree = [
            (e2, j) for e2, j in checkpoints
            if torch.allclose(labels, teacher(distiller.experts[e2].params[j], images),
                              rtol=1e-5, atol=1e-5)
        ]
        assert agree == [(e, epoch)], (name, e, target_epoch, agree)
    # The saved labels: expert 0 at the latest target epoch (sla-last: its last epoch).
    last_target = cfg.max_start_epoch - 1 + cfg.match_epochs
    epoch = distiller.experts[0].epochs if name == "sla-last" else last_target
    expected = torch.softmax(teacher(distiller.experts[0].params[epoch], distiller.state.images),
                             -1)
    torch.testing.assert_close(distiller.synthetic_set().labels, expected, rtol=1e-5, atol=1e-6)


def _scripted_match(bad_call: int | None = None, bad_part: str | None = None):
    """A stand-in for match_trajectory: finite random results, except that call ``bad_call``
    (0-based) gets one non-finite entry in ``bad_part`` (loss, images, labels or lr)."""
    calls = []

    def fake(model, start, target, images, labels, lr, *args, **kwargs):
        gen = torch.Generator().manual_seed(len(calls))
        parts = {
            "loss": torch.tensor(0.5),
            "images": 0.01 * torch.randn(images.shape, generator=gen),
            "labels": (torch.randn(labels.shape, generator=gen)
                       if labels.is_floating_point() else None),
            "lr": torch.tensor(0.3),
        }
        if len(calls) == bad_call:
            part = parts[bad_part].clone()
            part.view(-1)[-1] = float("nan") if bad_part != "lr" else float("inf")
            parts[bad_part] = part
        calls.append(len(calls))
        return MatchResult(parts["loss"], parts["images"], parts["labels"], parts["lr"])

    return fake


def _snapshot(state):
    """Everything an update may change: the learned tensors and their momenta, cloned."""
    return {**{k: v.clone() for k, v in state.tensors().items()},
            **{f"momentum/{k}": v.clone() for k, v in state.momentum.momentum.items()}}


def _moved(a, b):
    """The names whose tensors differ between two snapshots."""
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.mark.parametrize(
    "strategy, bad_part",
    [("hard", "loss"), ("hard", "images"), ("hard", "lr"), ("learned", "labels"),
     ("learned", "images")],
)
def test_one_non_finite_part_skips_the_whole_update(
    tmp_path, experts_dir, digits, experts, monkeypatch, strategy, bad_part
):
    """One non-finite entry anywhere the update reads: nothing moves (images, logits, log(beta)
    and their momenta), the skip is counted and logged, and the next iteration updates again."""
    distiller = make(config(experts_dir, label_strategy=strategy), tmp_path, digits, experts)
    monkeypatch.setattr(distill_module, "match_trajectory", _scripted_match(1, bad_part))
    initial = _snapshot(distiller.state)
    distiller.step()  # a finite update: everything learned moves, the momenta become non-zero
    before = _snapshot(distiller.state)
    assert _moved(before, initial) == set(before), "nothing to compare"
    distiller.step()  # the non-finite one
    assert _moved(_snapshot(distiller.state), before) == set()
    assert distiller.state.skipped == 1 and distiller.state.log["skipped"] == [0.0, 1.0]
    distiller.step()  # finite again: the run goes on
    assert _moved(_snapshot(distiller.state), before) == set(before)
    assert distiller.state.skipped == 1 and distiller.state.log["skipped"] == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("strategy", ["hard", "sla", "sla-only"])
def test_a_label_gradient_that_is_not_learned_does_not_block_the_update(
    tmp_path, experts_dir, digits, experts, monkeypatch, strategy
):
    """The label-logit gradient is checked only when the strategy learns the logits: for the
    others a NaN in it is ignored (its log entry is NaN anyway) and the update goes ahead."""
    learns = LABEL_STRATEGIES[strategy]
    assert not learns.learns_logits
    distiller = make(config(experts_dir, label_strategy=strategy), tmp_path, digits, experts)
    fake = _scripted_match(0, "labels")

    def with_label_grad(model, start, target, images, labels, *args, **kwargs):
        logits = torch.zeros(len(images), 10)  # hard labels get no gradient: give them one
        return fake(model, start, target, images, logits, *args, **kwargs)

    monkeypatch.setattr(distill_module, "match_trajectory", with_label_grad)
    before = _snapshot(distiller.state)
    distiller.step()
    assert distiller.state.log["skipped"] == [0.0] and distiller.state.skipped == 0
    expected = {"log_lr", "momentum/log_lr"}
    if learns.learns_images:
        expected |= {"images", "momentum/images"}
    assert _moved(_snapshot(distiller.state), before) == expected


def test_an_update_that_overflows_the_images_is_skipped(
    tmp_path, experts_dir, digits, experts, monkeypatch
):
    """A finite gradient times a too-large lr_img can overflow float32 (3e38 * 1000 = inf). The
    update is then not committed (the next iteration's matching would refuse inf images): it is
    skipped and counted like a non-finite gradient, and the run goes on."""
    distiller = make(config(experts_dir, lr_img=1000.0), tmp_path, digits, experts)

    def huge(model, start, target, images, labels, lr, *args, **kwargs):
        return MatchResult(torch.tensor(0.5), torch.full_like(images, 3e38), None,
                           torch.tensor(0.1))

    monkeypatch.setattr(distill_module, "match_trajectory", huge)
    before = _snapshot(distiller.state)
    distiller.step()
    assert _moved(_snapshot(distiller.state), before) == set()
    assert distiller.state.skipped == 1 and distiller.state.log["skipped"] == [1.0]
    monkeypatch.undo()
    distiller.step()  # real matching on the images, which are still finite
    assert distiller.state.skipped == 1 and torch.isfinite(distiller.state.images).all()
    assert not torch.equal(distiller.state.images, before["images"])


@pytest.mark.parametrize("clip, expected_step", [(None, 40.0 * 0.1), (0.5, 0.5 * 0.1)])
def test_lr_grad_clip_bounds_one_step_of_log_beta(
    tmp_path, experts_dir, digits, experts, monkeypatch, clip, expected_step
):
    # A segment whose beta gradient is huge: without the clip, log(beta) jumps by lr_lr * 40.
    def spike(model, start, target, images, labels, lr, *args, **kwargs):
        return MatchResult(
            torch.tensor(2.0), torch.zeros_like(images), None, torch.tensor(40.0) / lr
        )

    cfg = config(experts_dir, lr_lr=0.1, lr_grad_clip=clip)
    distiller = make(cfg, tmp_path, digits, experts)
    before = float(distiller.state.log_lr)
    monkeypatch.setattr(distill_module, "match_trajectory", spike)
    distiller.step()
    assert before - float(distiller.state.log_lr) == pytest.approx(expected_step, rel=1e-5)
    assert distiller.state.log["lr_grad_norm"] == [pytest.approx(40.0)]  # the unclipped value


def test_killed_run_resumes_bitwise(tmp_path, experts_dir, digits, experts, monkeypatch):
    cfg = config(experts_dir, label_strategy="learned", iterations=5, save_every=2)
    full = make(cfg, tmp_path / "full", digits, experts).run()

    killed = make(cfg, tmp_path / "killed", digits, experts)
    real_step = killed.step

    def dies_at_iteration_4():
        if killed.state.iteration == 3:
            raise KeyboardInterrupt  # the process is killed mid-run, after the checkpoint at 2
        real_step()

    monkeypatch.setattr(killed, "step", dies_at_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    assert not (tmp_path / "killed" / "synthetic.safetensors").exists()
    resumed_distiller = make(cfg, tmp_path / "killed", digits, experts)
    assert resumed_distiller.state.iteration == 2  # the last checkpoint
    resumed = resumed_distiller.run()
    assert torch.equal(resumed.images, full.images)
    assert torch.equal(resumed.label_logits, full.label_logits)
    assert resumed.lr == full.lr


def test_resume_with_another_config_is_refused(tmp_path, experts_dir, digits, experts):
    make(config(experts_dir), tmp_path, digits, experts).run(stop_after=2)
    with pytest.raises(ValueError, match=r"belongs to another run.*lr_img"):
        make(config(experts_dir, lr_img=5.0), tmp_path, digits, experts)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(ipc=10_000), r"ipc 10000 is larger than class \d+ \('\d'\), which has \d+"),
        (dict(batch_syn=21), r"batch_syn 21 is larger than the synthetic set \(ipc 2 x 10"),
        (
            dict(max_start_epoch=3, match_epochs=2),
            r"needs checkpoints up to epoch 4.*have 3 epochs",
        ),
        (dict(dataset="fashion-mnist"), r"trained on 'digits'.*distils 'fashion-mnist'"),
    ],
)
def test_bad_setups_fail_before_any_work(tmp_path, experts_dir, digits, experts, changes, message):
    with pytest.raises(ValueError, match=message):
        make(config(experts_dir, **changes), tmp_path, digits, experts)
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_a_checkpoint_from_before_a_new_field_resumes_at_its_default(tmp_path, experts_dir,
                                                                      digits, experts):
    """A checkpoint whose config lacks a field DistillConfig has now (keep_graphs, say) resumes
    with that field at its default, and is refused with another value."""
    make(config(experts_dir), tmp_path, digits, experts).run(stop_after=2)
    path = tmp_path / distill_module.CHECKPOINT
    tensors, header = load_tensors(path)
    del header["config"]["keep_graphs"]
    save_tensors(path, tensors, header)
    assert make(config(experts_dir), tmp_path, digits, experts).state.iteration == 2
    with pytest.raises(ValueError, match=r"keep_graphs: saved .auto. vs now 2"):
        make(config(experts_dir, keep_graphs=2), tmp_path, digits, experts)


def test_keep_graphs_reaches_the_matching_and_leaves_the_set_alone(tmp_path, experts_dir, digits,
                                                                   experts, monkeypatch):
    """keep_graphs trades memory for time only: from the same seed exact distils the same set
    with keep_graphs 0 and 2 (float64, to 1e-10), and the call receives the config's k."""
    from tests.test_golden import _as_float64

    data64, experts64 = _as_float64(digits, experts)
    seen, real = [], distill_module.match_trajectory

    def spy(*args, **kwargs):
        seen.append(kwargs["keep_graphs"])
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_module, "match_trajectory", spy)
    states = {}
    for keep in (0, 2):
        cfg = config(experts_dir, method="exact", keep_graphs=keep, lr_img=100.0)
        distiller = Distiller(cfg, tmp_path / str(keep), progress=False, dataset=data64,
                              experts=experts64)
        for _ in range(2):
            distiller.step()
        states[keep] = distiller.state
    assert seen == [0, 0, 2, 2]
    for name, value in states[0].tensors().items():
        torch.testing.assert_close(states[2].tensors()[name], value, rtol=1e-10,
                                   atol=1e-10 * float(value.abs().max()))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(syn_steps=0), "syn_steps must be None or a positive int"),
        (dict(iterations=0), "iterations must be None or a positive int"),
        (dict(beta_bound=1.0), "beta_bound must be > 1, or inf for no bound"),
        (dict(max_skipped=-1), "max_skipped must be an int >= 0"),
        (dict(state_stride=0), "state_stride must be a positive int"),
        (dict(keep_graphs=-1), "keep_graphs must be .auto. or an int >= 0"),
        (dict(microbatch_size=0), "microbatch_size must be None or a positive int"),
        (dict(method="adjoint"), "method 'adjoint' is unknown"),
        (dict(label_strategy="soft"), "label_strategy 'soft' is unknown"),
        (dict(lr_init=-0.1), "lr_init must be None or finite and > 0"),
        (dict(lr_img=float("nan")), "lr_img must be finite"),
        (dict(lr_grad_clip=0.0), "lr_grad_clip must be > 0, or inf for no clip"),
        (dict(lr_grad_clip=float("nan")), "lr_grad_clip must be > 0, or inf for no clip"),
        (dict(image_init="zeros"), "image_init 'zeros' is unknown"),
    ],
)
def test_bad_config_values(changes, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**changes)


# ----------------------------------------------------------------------------------------------
# What the log records of the labels, snapshots of the images, and the picture of the set


def test_label_drift_and_class_counts_are_logged(tmp_path, experts_dir, digits, experts,
                                                 monkeypatch):
    # hard labels never drift: 0 every iteration, ipc images in every class
    hard = make(config(experts_dir, iterations=2), tmp_path / "hard", digits, experts)
    hard.run()
    assert hard.state.log["label_drift"] == [0.0, 0.0]
    assert hard.state.log["class_count"] == [[2.0] * 10] * 2
    # SLA: by hand, from the labels each iteration trained on (the teacher's logits)
    seen = []
    real = distill_module.match_trajectory

    def spy(model, start, target, images, labels, *args, **kwargs):
        seen.append(labels.clone())
        return real(model, start, target, images, labels, *args, **kwargs)

    monkeypatch.setattr(distill_module, "match_trajectory", spy)
    cfg = config(experts_dir, label_strategy="sla", iterations=3, lr_img=3000.0)
    sla = make(cfg, tmp_path / "sla", digits, experts)
    sla.run()
    classes = torch.arange(10).repeat_interleave(2)
    assert len(seen) == 3
    for labels, drift, counts in zip(seen, sla.state.log["label_drift"],
                                     sla.state.log["class_count"]):
        teacher = labels.argmax(1)
        assert drift == (teacher != classes).sum().item() / 20
        assert counts == torch.bincount(teacher, minlength=10).double().tolist()
        assert sum(counts) == 20
    assert max(sla.state.log["label_drift"]) > 0  # these weak experts disagree with the classes
    log = load_results(tmp_path / "sla" / "log.nc")
    assert log["class_count"].dims == ("iteration", "class")
    assert log["class_count"].values.tolist() == sla.state.log["class_count"]
    assert list(log["class_name"].values) == list(digits.info.class_names)
    assert log["label_drift"].attrs["units"] == "fraction"


def test_snapshots_are_kept_and_a_resumed_run_rewrites_them_bitwise(
    tmp_path, experts_dir, digits, experts, monkeypatch
):
    from tesla_func.synthetic import snapshot_path, snapshot_paths

    cfg = config(experts_dir, label_strategy="learned", iterations=5, save_every=2,
                 snapshot_every=2)
    full = make(cfg, tmp_path / "full", digits, experts)
    full.run()
    kept = snapshot_paths(tmp_path / "full")
    assert kept == [snapshot_path(tmp_path / "full", i) for i in (0, 2, 4, 5)]
    first, last = load_synthetic(kept[0]), load_synthetic(kept[-1])
    assert first.header["iteration"] == 0 and last.header["iteration"] == 5
    initial = make(cfg, tmp_path / "fresh", digits, experts).state
    assert torch.equal(first.images, initial.images)
    assert torch.equal(first.label_logits, initial.label_logits)
    assert torch.equal(last.images, load_synthetic(tmp_path / "full" / "synthetic.safetensors")
                       .images)

    killed = make(cfg, tmp_path / "killed", digits, experts)
    real_step = killed.step

    def dies_at_iteration_4():
        if killed.state.iteration == 3:
            raise KeyboardInterrupt  # killed after the checkpoint (and snapshot) at 2
        real_step()

    monkeypatch.setattr(killed, "step", dies_at_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    assert snapshot_paths(tmp_path / "killed") == [snapshot_path(tmp_path / "killed", i)
                                                   for i in (0, 2)]
    resumed = make(cfg, tmp_path / "killed", digits, experts)
    resumed.run()
    for a, b in zip(kept, snapshot_paths(tmp_path / "killed"), strict=True):
        x, y = load_synthetic(a), load_synthetic(b)
        assert torch.equal(x.images, y.images) and torch.equal(x.label_logits, y.label_logits)
        assert x.lr == y.lr and x.header["iteration"] == y.header["iteration"]
    for name in ("label_drift", "class_count", "loss"):
        assert resumed.state.log[name] == full.state.log[name]


def test_a_finished_run_draws_its_set(tmp_path, experts_dir, digits, experts):
    make(config(experts_dir, iterations=1, label_strategy="learned"), tmp_path, digits,
         experts).run()
    from PIL import Image

    png = tmp_path / "synthetic.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    width, height = Image.open(png).size
    assert height > width  # 10 rows (classes) of 2 images


@pytest.mark.parametrize("value", [-1, True, 1.5])
def test_snapshot_every_must_be_a_non_negative_int(value):
    with pytest.raises(ValueError, match="snapshot_every must be an int >= 0"):
        DistillConfig(snapshot_every=value)


@pytest.mark.parametrize("strategy", ["hard", "learned"])
def test_exact_and_unrolled_distil_the_same_set(tmp_path, experts_dir, digits, experts, strategy):
    """exact computes MTT's gradient (proofs/c_adjoint.md), so from the same seed it distils the
    set unrolled distils: in float64, to 1e-10 after a few iterations (DSA on, state_stride 2)."""
    from tests.test_golden import _as_float64

    data64, experts64 = _as_float64(digits, experts)
    states = {}
    for method in ("unrolled", "exact"):
        cfg = config(experts_dir, method=method, label_strategy=strategy, state_stride=2,
                     lr_img=100.0)
        distiller = Distiller(cfg, tmp_path / method, progress=False, dataset=data64,
                              experts=experts64)
        assert distiller.state.images.dtype == torch.float64
        initial = distiller.state.tensors()
        for _ in range(3):
            distiller.step()
        states[method] = distiller.state
    a, b = states["exact"], states["unrolled"]
    assert a.skipped == b.skipped == 0
    assert all(not torch.equal(v, initial[k]) for k, v in b.tensors().items())  # all moved
    assert a.log["expert"] == b.log["expert"] and a.log["start_epoch"] == b.log["start_epoch"]
    for name, value in b.tensors().items():
        torch.testing.assert_close(a.tensors()[name], value, rtol=1e-10,
                                   atol=1e-10 * float(value.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(torch.tensor(a.log["loss"]), torch.tensor(b.log["loss"]),
                               rtol=1e-10, atol=0)


def test_noise_initialised_images_are_seeded_standard_normal(tmp_path, experts_dir, digits,
                                                             experts):
    """image_init="noise": N(0, 1) images of the real images' shape, drawn from the run's seed
    (the same set for the same seed, another for another), not real images; they distil."""
    def first_images(seed, init="noise"):
        cfg = config(experts_dir, image_init=init, seed=seed)
        return make(cfg, tmp_path / f"{init}{seed}", digits, experts).state.images

    noise, real = first_images(0), first_images(0, "real")
    assert noise.shape == real.shape == (20, 1, 8, 8) and noise.dtype == real.dtype
    assert torch.equal(noise, first_images(0)) and not torch.equal(noise, first_images(1))
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1  # 1280 draws
    train = digits.train_images.flatten(1)

    def nearest(images):  # distance of each image to the closest training image
        return torch.cdist(images.flatten(1), train,
                           compute_mode="donot_use_mm_for_euclid_dist").min(1).values

    assert (nearest(real) == 0).all() and (nearest(noise) > 1.0).all()
    distiller = make(config(experts_dir, image_init="noise"), tmp_path / "run", digits, experts)
    distiller.step()
    assert distiller.state.skipped == 0 and not torch.equal(distiller.state.images, noise)


def test_load_synthetic_refuses_other_files(tmp_path, experts_dir, digits, experts):
    """load_synthetic names the file and says what it is not: an expert file, a distillation
    checkpoint, a set's tensors under another format, a file that is not safetensors, a
    truncated set; a missing file is FileNotFoundError."""
    from tesla_func.experts import expert_path
    from tesla_func.fileio import load_tensors, save_tensors

    make(config(experts_dir), tmp_path / "run", digits, experts).run(stop_after=1)
    checkpoint = tmp_path / "run" / "checkpoint.safetensors"
    assert checkpoint.exists() and not (tmp_path / "run" / "synthetic.safetensors").exists()
    for path in (expert_path(experts_dir, 0), checkpoint):
        with pytest.raises(ValueError, match=r"is not a tesla_func synthetic set \(format "
                                             r"'tesla_func\.(expert|distill_checkpoint)'"):
            load_synthetic(path)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(ValueError, match="notes.safetensors"):
        load_synthetic(text)
    good = tmp_path / "good.safetensors"
    make(config(experts_dir), tmp_path / "run", digits, experts).synthetic_set().save(good)
    assert torch.equal(load_synthetic(good).labels, torch.arange(10).repeat_interleave(2))
    tensors, header = load_tensors(good)  # the right tensors under another format's name
    renamed = tmp_path / "renamed.safetensors"
    save_tensors(renamed, tensors, {**header, "format": "tesla_func.golden"})
    with pytest.raises(ValueError, match=r"renamed.safetensors is not a tesla_func synthetic set"):
        load_synthetic(renamed)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_synthetic(truncated)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_synthetic(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------
# A run never dies of its own learning rate; it stops, says why, and keeps its last good set


def _beta_pushed(direction: float, images_grad: float = 0.01):
    """A stand-in for match_trajectory whose beta gradient drives log(beta) up (direction +1)
    or down (-1) by 50 a step (dL/dlog(beta) = -50 * direction)."""
    def fake(model, start, target, images, labels, lr, *args, **kwargs):
        return MatchResult(torch.tensor(0.5), torch.full_like(images, images_grad), None,
                           torch.tensor(-50.0 * direction) / lr)
    return fake


def _stops(tmp_path, experts_dir, digits, experts, monkeypatch, match, **changes):
    """Run ``config(**changes)`` with ``match`` as the matching; the DistillationStopped it
    raises, and the set it wrote."""
    cfg = config(experts_dir, iterations=10, lr_grad_clip=None, **changes)
    distiller = make(cfg, tmp_path, digits, experts)
    monkeypatch.setattr(distill_module, "match_trajectory", match)
    with pytest.raises(distill_module.DistillationStopped) as stop:
        distiller.run()
    written = load_synthetic(tmp_path / "synthetic.safetensors")
    assert (tmp_path / "log.nc").is_file() and (tmp_path / "synthetic.png").is_file()
    assert written.header["stopped"] in str(stop.value)
    assert load_results(tmp_path / "log.nc").attrs["stopped"] == written.header["stopped"]
    assert torch.isfinite(written.images).all() and 0 < written.lr < float("inf")
    return str(stop.value), written, distiller


@pytest.mark.parametrize("direction, side", [(1, "rose to its upper"), (-1, "fell to its lower")])
def test_beta_at_its_bound_stops_the_run_with_its_set(
    tmp_path, experts_dir, digits, experts, monkeypatch, direction, side
):
    message, written, distiller = _stops(tmp_path, experts_dir, digits, experts, monkeypatch,
                                         _beta_pushed(direction))
    assert f"beta {side} bound" in message and "at iteration 1" in message
    for flag in ("--lr-lr", "--lr-img", "--syn-steps", "--beta-bound"):
        assert flag in message
    assert written.lr == pytest.approx(distiller.beta0 * 1000.0 ** direction, rel=1e-5)
    assert written.header["iteration"] == 1 and str(tmp_path / "synthetic.safetensors") in message


@pytest.mark.parametrize("direction", [1, -1])  # overflow of exp(log beta) to inf, underflow to 0
def test_without_a_bound_beta_overflow_is_skipped_then_stops(
    tmp_path, experts_dir, digits, experts, monkeypatch, direction
):
    """log(beta) moves by 50, then by 75 (momentum): exp of it is inf (or 0) in float32, so that
    update is skipped like any non-finite one; the same happens again, and at max_skipped the
    run stops with the set of iteration 1, at a finite, positive beta."""
    message, written, distiller = _stops(
        tmp_path, experts_dir, digits, experts, monkeypatch, _beta_pushed(direction),
        beta_bound=None, max_skipped=2)
    assert message.startswith("2 updates were skipped by iteration 3")
    assert "--max-skipped" in message and "--lr-img" in message
    assert distiller.state.log["skipped"] == [0.0, 1.0, 1.0]
    assert written.lr == pytest.approx(distiller.beta0 * torch.e ** (50.0 * direction), rel=1e-3)
    more = config(experts_dir, iterations=10, lr_grad_clip=None, beta_bound=None, max_skipped=5)
    assert make(more, tmp_path, digits, experts).state.iteration == 3  # resumes where it stopped


def test_a_stopped_run_reports_from_the_command_line(tmp_path, experts_dir, monkeypatch, capsys):
    from tesla_func import cli

    monkeypatch.setattr(distill_module, "match_trajectory", _beta_pushed(1))
    run = tmp_path / "run"
    status = cli.main(["distill", "--experts-dir", str(experts_dir), "--match-epochs", "1",
                       "--lr-grad-clip", "4", "--lr-lr", "10", "--out", str(run),
                       "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1 and "tesla-func distill: stopped: beta rose to its upper bound" in err
    assert "tesla-func distill: warning: beta rose from" in err  # one line, no source line
    assert (run / "synthetic.safetensors").is_file() and (run / "log.nc").is_file()


# ----------------------------------------------------------------------------------------------
# Warnings where the result cannot be good: shown once, kept in the set's header and log.nc


def _warned(distiller, tmp_path, kind_phrase: str) -> None:
    header = load_synthetic(tmp_path / "synthetic.safetensors").header
    assert [w for w in header["warnings"] if kind_phrase in w], header["warnings"]
    assert header["warnings"] == load_results(tmp_path / "log.nc").attrs["warnings"]


def test_beta_far_from_its_start_is_warned_of(tmp_path, experts_dir, digits, experts,
                                              monkeypatch):
    # log(beta) falls by 2.5 an iteration: 12x, 148x, 1808x below beta0
    cfg = config(experts_dir, iterations=3, lr_grad_clip=None, lr_lr=0.05, momentum=0.0,
                 beta_bound=1e4)
    distiller = make(cfg, tmp_path, digits, experts)
    monkeypatch.setattr(distill_module, "match_trajectory", _beta_pushed(-1))
    with pytest.warns(RunWarning, match="beta fell from .* at iteration 2") as w:
        distiller.run()
    assert len([x for x in w if "beta fell" in str(x.message)]) == 1  # once, not every iteration
    _warned(distiller, tmp_path, "--lr-lr")


def test_images_far_larger_than_real_ones_are_warned_of(tmp_path, experts_dir, digits, experts,
                                                        monkeypatch):
    distiller = make(config(experts_dir, iterations=1), tmp_path, digits, experts)
    monkeypatch.setattr(distill_module, "match_trajectory", _beta_pushed(0, images_grad=-1.0))
    with pytest.warns(RunWarning, match="the images' norm grew to"):
        distiller.run()
    assert distiller.state.log["images_norm"][0] > 10 * distiller.real_norm
    _warned(distiller, tmp_path, "lower --lr-img")


def test_labels_collapsing_onto_few_classes_are_warned_of(tmp_path, experts_dir, digits,
                                                          experts, monkeypatch):
    def one_class(model, params, images):
        return torch.nn.functional.one_hot(torch.zeros(len(images), dtype=torch.long), 10).float()

    monkeypatch.setattr(distill_module, "teacher_logits", one_class)
    distiller = make(config(experts_dir, label_strategy="sla", iterations=1), tmp_path, digits,
                     experts)
    with pytest.warns(RunWarning, match="only 1 of 10 classes"):
        distiller.run()
    _warned(distiller, tmp_path, "--label-strategy hard")


def test_weak_experts_and_a_too_long_student_are_warned_of(tmp_path, experts_dir, digits,
                                                           experts):
    weak = [dataclasses.replace(e, test_accuracy=(0.1,) * len(e.test_accuracy)) for e in experts]
    with pytest.warns(RunWarning) as w:
        distiller = make(config(experts_dir, iterations=1, syn_steps=6), tmp_path, digits, weak)
    messages = [str(x.message) for x in w]
    assert any("expert 0 (and 1 more) reached only 10.0%" in m for m in messages), messages
    # one epoch (match_epochs 1) of 1238 images in batches of 256 is 5 steps
    assert any("syn_steps 6 is longer than the 5 SGD steps" in m for m in messages), messages
    distiller.run()
    assert len(load_synthetic(tmp_path / "synthetic.safetensors").header["warnings"]) == 2


def test_keep_graphs_auto_is_chosen_once_and_logged(tmp_path, experts_dir, digits, experts,
                                                    monkeypatch, capsys):
    """The default keep_graphs "auto" picks k once per run (tesla_func/planner/auto.py: here
    against memory_budget, T = 3), every call receives it, and the run says which: on its
    progress line and in log.nc."""
    seen, real = [], distill_module.match_trajectory

    def spy(*args, **kwargs):
        seen.append(kwargs["keep_graphs"])
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_module, "match_trajectory", spy)
    for budget, keep in (("1B", 0), ("1TB", 3)):
        cfg = config(experts_dir, method="exact", memory_budget=budget, iterations=2)
        assert cfg.keep_graphs == "auto"
        distiller = Distiller(cfg, tmp_path / budget, progress=True, dataset=digits,
                              experts=experts)
        distiller.run()
        assert distiller.keep_choice.keep == keep
        log = load_results(tmp_path / budget / "log.nc")
        assert log.attrs["keep_graphs"] == keep and log.attrs["keep_graphs_requested"] == "auto"
        assert log.attrs["keep_graphs_memory"] == "memory_budget"
        assert f"keep_graphs auto: k = {keep} of T = 3 for exact" in capsys.readouterr().out
    assert seen == [0, 0, 3, 3]
