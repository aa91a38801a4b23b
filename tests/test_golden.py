"""Golden outputs: the synthetic sets a small fixed-seed distillation produces, pinned bit for bit.

Every gradient method x every label strategy distils a few iterations on ``digits`` from the same
tiny experts; the resulting images, labels, label logits and learned lr are stored in
``tests/golden/distill.safetensors`` together with the experts' final weights. A refactoring that
moves code without changing behaviour reproduces them exactly. A change that alters only the
order of floating-point operations must show that the difference is rounding: the float64 runs
stored beside them are compared to :data:`FLOAT64_TOL` of each tensor's largest entry, then the
float32 golden file is regenerated in a commit that says why::

    python tests/test_golden.py        # rewrite tests/golden/distill.safetensors

Bitwise equality holds for the CPU model, instruction set, thread count (1, as the tests run) and
torch version the file was written with (its header records them); elsewhere only the float64
runs are checked, from the expert trajectories stored in the file.

Why the float64 tolerance is relative to the largest entry, not to each entry: another CPU (AVX2
against AVX-512, another thread count) sums the same terms in another order, so each entry can
differ by about eps times the sum of the magnitudes of its terms, whatever the entry's own size.
An image pixel is a sum of terms of the images' scale; where they cancel, the pixel is small and
its error is not: between the AVX2 machine that wrote the file and an AVX-512 one, pixels near
0 differed by 4e-12 (an elementwise rtol of 1e-12 failed), which is 6e-15 of the largest pixel;
the learned lr and label logits differed by under 2e-15 of theirs. Three iterations of three
student steps amplify rounding little, so 1e-12 of the largest entry leaves a margin of over 100x
and still catches a change of the algorithm, which moves entries by far more.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
import torch

from tesla_func.data import Dataset, load_dataset
from tesla_func.distill import DistillConfig, Distiller
from tesla_func.experts import ExpertConfig, ExpertTrajectory, load_experts, train_experts
from tesla_func.fileio import load_tensors, save_tensors
from tesla_func.matching import METHODS
from tesla_func.provenance import device_name

GOLDEN = Path(__file__).parent / "golden" / "distill.safetensors"
STRATEGIES = ("hard", "sla", "sla-last", "learned", "sla-only")
FLOAT64_RUNS = (("tesla", "learned"), ("exact", "hard"))  # also run in float64 (rounding check)
FLOAT64_TOL = 1e-12  # float64 runs agree to this fraction of each tensor's largest entry


def _expert_config() -> ExpertConfig:
    # every field the dataset's defaults would set is given: the file pins these runs
    return ExpertConfig(dataset="digits", num_experts=2, epochs=3, width=8, depth=3, lr=0.01,
                        seed=0, dsa=True)


def _distill_config(experts_dir: Path, method: str, strategy: str) -> DistillConfig:
    return DistillConfig(
        experts_dir=str(experts_dir),
        dataset="digits",
        ipc=2,
        method=method,
        label_strategy=strategy,
        iterations=3,
        syn_steps=3,
        match_epochs=1,
        max_start_epoch=2,
        batch_syn=10,
        lr_img=100.0,
        lr_lr=1.0,
        lr_grad_clip=0.5,
        beta_bound=None,
        max_skipped=0,
        lr_labels=5.0,
        eval_epochs=1,
        eval_models=1,
        save_every=2,
        dsa=True,
        seed=3,
        # k = 0 as when the file was written: keep_graphs only changes rounding (the first pass
        # then builds each step's graph), tested in float64 (tests/test_keep_auto.py)
        keep_graphs=0,
    )


def _as_float64(dataset: Dataset, experts: list[ExpertTrajectory]):
    data64 = dataclasses.replace(
        dataset,
        train_images=dataset.train_images.double(),
        test_images=dataset.test_images.double(),
    )
    experts64 = [
        dataclasses.replace(e, params=tuple({k: v.double() for k, v in p.items()} for p in e.params))
        for e in experts
    ]
    return data64, experts64


def golden_runs(workdir: Path, stored: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
    """Train the experts, distil every (method, strategy); name -> tensor of everything pinned.

    The float64 runs start from the expert trajectories in ``stored`` (the golden file's) when
    given, so that they do not inherit the last bits of this CPU's float32 expert training:
    their check then holds on any CPU. The trajectories trained here are returned too."""
    torch.set_num_threads(1)
    # Every training image, as when the file was first written (before the validation split):
    # the file pins the algorithm, not the choice of data.
    dataset = load_dataset("digits", val_per_class=0)
    experts_dir = workdir / "experts"
    train_experts(_expert_config(), experts_dir, dataset=dataset, progress=False)
    experts = load_experts(experts_dir)
    out: dict[str, torch.Tensor] = {}
    for i, expert in enumerate(experts):
        for name, value in expert.params[-1].items():
            out[f"expert{i}/{name}"] = value
        for epoch, params in enumerate(expert.params):
            out.update({f"trajectory{i}/epoch{epoch}/{k}": v.clone() for k, v in params.items()})
    recorded = experts if stored is None else [
        dataclasses.replace(e, params=tuple(
            {k: stored[f"trajectory{i}/epoch{epoch}/{k}"] for k in p} for epoch, p in
            enumerate(e.params)))
        for i, e in enumerate(experts)
    ]
    runs = [(m, s, torch.float32) for m in METHODS for s in STRATEGIES]
    runs += [(m, s, torch.float64) for m, s in FLOAT64_RUNS]
    for method, strategy, dtype in runs:
        cfg = _distill_config(experts_dir, method, strategy)
        data, trajectories = (
            (dataset, experts) if dtype == torch.float32 else _as_float64(dataset, recorded)
        )
        tag = f"{method}/{strategy}" + ("/float64" if dtype == torch.float64 else "")
        synthetic = Distiller(
            cfg, workdir / tag.replace("/", "-"), progress=False, dataset=data, experts=trajectories
        ).run()
        out[f"{tag}/images"] = synthetic.images
        out[f"{tag}/labels"] = synthetic.labels
        out[f"{tag}/lr"] = torch.tensor(synthetic.lr, dtype=torch.float64)
        if synthetic.label_logits is not None:
            out[f"{tag}/label_logits"] = synthetic.label_logits
    return out


def _machine() -> dict[str, str]:
    """What decides the last bits of a float32 run: the CPU model (oneDNN picks kernels by it,
    not only by instruction set), the instruction set, the thread count and torch's version."""
    return {
        "cpu": device_name("cpu").rsplit(" (", 1)[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": "1",
        "torch": torch.__version__,
    }


@pytest.fixture(scope="module")
def produced(tmp_path_factory, golden) -> dict[str, torch.Tensor]:
    return golden_runs(tmp_path_factory.mktemp("golden"), stored=golden[0])


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, torch.Tensor], dict]:
    return load_tensors(GOLDEN)


def test_same_keys_as_the_golden_file(produced, golden):
    assert sorted(produced) == sorted(golden[0])


def test_float64_runs_agree_to_rounding(produced, golden):
    """From the stored expert trajectories, on any CPU (the module docstring: why the tolerance
    is a fraction of the largest entry)."""
    for key, expected in golden[0].items():
        if "/float64/" in key:
            scale = float(expected.abs().max())
            torch.testing.assert_close(produced[key], expected, rtol=0, atol=FLOAT64_TOL * scale,
                                       msg=key)


def test_float32_outputs_are_bitwise_the_golden_ones(produced, golden):
    tensors, header = golden
    if header.get("machine") != _machine():
        pytest.skip(f"golden file written on {header.get('machine')}, this is {_machine()}")
    different = {
        key: float((produced[key].double() - value.double()).abs().max())
        for key, value in tensors.items()
        if "/float64/" not in key and not torch.equal(produced[key], value)
    }
    assert not different, f"not bitwise the golden outputs (max abs differences): {different}"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        tensors = golden_runs(Path(tmp))
    save_tensors(GOLDEN, tensors, {"format": "tesla_func.golden", "machine": _machine()})
    print(f"wrote {len(tensors)} tensors to {GOLDEN}")
