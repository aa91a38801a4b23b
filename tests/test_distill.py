"""Distillation (Algorithm 1): label strategies, the non-finite guard, bitwise resume, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tesla_func.distill as distill_module
from tesla_func.data import load_dataset
from tesla_func.distill import DistillConfig, Distiller
from tesla_func.experts import ExpertConfig, load_experts, train_experts
from tesla_func.labels import LABEL_STRATEGIES, LabelStrategy
from tesla_func.matching import MatchResult
from tesla_func.results import load_results
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


def test_sla_labels_come_from_the_target_checkpoint(
    tmp_path, experts_dir, digits, experts, monkeypatch
):
    seen = []
    real = distill_module.match_trajectory

    def spy(model, start, target, images, labels, *args, **kwargs):
        seen.append((target, images.clone(), labels.clone()))
        return real(model, start, target, images, labels, *args, **kwargs)

    monkeypatch.setattr(distill_module, "match_trajectory", spy)
    distiller = make(config(experts_dir, label_strategy="sla", iterations=1), tmp_path, digits,
                     experts)
    distiller.step()
    target, images, labels = seen[0]
    teacher = torch.func.functional_call(distiller.model, target, (images,))
    torch.testing.assert_close(labels, teacher)


def test_non_finite_update_is_skipped_and_counted(
    tmp_path, experts_dir, digits, experts, monkeypatch
):
    def broken(*args, **kwargs):
        images = args[3]
        return MatchResult(
            torch.tensor(float("nan")),
            torch.full_like(images, float("nan")),
            None,
            torch.tensor(float("inf")),
        )

    distiller = make(config(experts_dir), tmp_path, digits, experts)
    before = (distiller.state.images.clone(), distiller.state.log_lr.clone())
    monkeypatch.setattr(distill_module, "match_trajectory", broken)
    distiller.step()
    assert distiller.state.skipped == 1 and distiller.state.log["skipped"] == [1.0]
    assert torch.equal(distiller.state.images, before[0])
    assert torch.equal(distiller.state.log_lr, before[1])


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


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(syn_steps=0), "syn_steps must be a positive int"),
        (dict(iterations=0), "iterations must be a positive int"),
        (dict(state_stride=0), "state_stride must be a positive int"),
        (dict(method="adjoint"), "method 'adjoint' is unknown"),
        (dict(label_strategy="soft"), "label_strategy 'soft' is unknown"),
        (dict(lr_init=-0.1), "lr_init must be None or finite and > 0"),
        (dict(lr_img=float("nan")), "lr_img must be finite"),
        (dict(lr_grad_clip=0.0), "lr_grad_clip must be None or finite and > 0"),
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
