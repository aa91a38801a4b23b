"""Expert trajectories on `digits` with tiny nets: files, learning, bitwise resume, load checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tesla_func.data import load_dataset
from tesla_func.experts import (
    ExpertConfig,
    expert_path,
    load_expert,
    load_experts,
    train_experts,
)
from tesla_func.fileio import load_tensors, save_tensors
from tesla_func.models import ConvNet, ConvNetConfig

# 8x8 digits, ConvNet depth 2 width 8 (8 -> 4 -> 2 px): ~0.1 s an epoch on one thread, and it
# learns within 3 epochs at lr 0.1 (depth 3 pools down to 1 px and learns far slower).
TINY = ExpertConfig(
    dataset="digits", num_experts=2, epochs=3, width=8, depth=2, batch_size=64, lr=0.1
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _train(cfg, out, digits, **kw):
    return train_experts(cfg, out, dataset=digits, progress=False, **kw)


def _all_tensors(directory):
    return {p.name: load_tensors(p)[0] for p in sorted(directory.glob("expert_*.safetensors"))}


def test_files_keys_header_and_learning(tmp_path, digits):
    state = torch.random.get_rng_state()
    paths = _train(TINY, tmp_path, digits)
    assert torch.equal(state, torch.random.get_rng_state())  # explicit generators only
    assert paths == [expert_path(tmp_path, 0), expert_path(tmp_path, 1)]
    assert not list(tmp_path.glob("*.partial"))  # the epoch checkpoints are gone
    experts = load_experts(tmp_path, expect_dataset="digits")
    arch = ConvNetConfig(channels=1, num_classes=10, image_size=8, width=8, depth=2)
    assert [e.config for e in experts] == [arch, arch]
    first = experts[0]
    names = [n for n, _ in ConvNet(arch).named_parameters()]
    assert first.epochs == 3 and len(first.params) == 4 and list(first.params[0]) == names
    tensors, header = load_tensors(paths[0])
    assert "epoch_000/features.0.weight" in tensors and "epoch_003/classifier.bias" in tensors
    assert header["architecture"] == arch.to_dict() and header["dataset"] == "digits"
    assert header["expert_config"] == TINY.to_dict() and header["lr"] == 0.1
    assert header["dataset_info"]["mean"] == list(digits.info.mean)
    assert len(header["seconds_per_epoch"]) == 3 and "version_torch" in header["provenance"]
    # The weights move every epoch, and the network learns (10 classes: chance is 0.1).
    assert all(
        not torch.equal(a["features.0.weight"], b["features.0.weight"])
        for a, b in zip(first.params, first.params[1:])
    )
    assert first.test_accuracy[0] < 0.25 and first.test_accuracy[-1] > 0.5, first.test_accuracy
    # Different experts start from different weights.
    assert not torch.equal(
        experts[1].params[0]["features.0.weight"], first.params[0]["features.0.weight"]
    )


class _Kill(Exception):
    pass


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("kill_at", [(0, 0), (1, 2)])
def test_a_killed_run_resumes_bitwise(tmp_path, digits, momentum, kill_at):
    cfg = dataclasses.replace(TINY, momentum=momentum)
    _train(cfg, tmp_path / "whole", digits)

    def kill(index, epoch, accuracy):
        if (index, epoch) == kill_at:
            raise _Kill

    with pytest.raises(_Kill):
        _train(cfg, tmp_path / "cut", digits, on_epoch=kill)
    partial = tmp_path / "cut" / f"expert_{kill_at[0]:03d}.partial"
    assert sorted(p.name for p in partial.iterdir()) == [
        f"epoch_{e:03d}.safetensors" for e in range(kill_at[1] + 1)
    ]
    assert not expert_path(tmp_path / "cut", kill_at[0]).exists()
    _train(cfg, tmp_path / "cut", digits)
    whole, cut = _all_tensors(tmp_path / "whole"), _all_tensors(tmp_path / "cut")
    assert whole.keys() == cut.keys()
    for name in whole:
        for key, value in whole[name].items():
            assert torch.equal(value, cut[name][key]), (name, key)
    accs = [e.test_accuracy for e in load_experts(tmp_path / "whole")]
    assert accs == [e.test_accuracy for e in load_experts(tmp_path / "cut")]


def test_resume_after_the_final_rename_and_with_more_experts(tmp_path, digits):
    one = dataclasses.replace(TINY, num_experts=1)
    _train(one, tmp_path, digits)
    stale = tmp_path / "expert_000.partial"
    stale.mkdir()  # killed between writing the expert file and removing its checkpoints
    before = expert_path(tmp_path, 0).stat().st_mtime_ns
    _train(TINY, tmp_path, digits)  # two experts now: the first is kept, the second trained
    assert not stale.exists() and expert_path(tmp_path, 0).stat().st_mtime_ns == before
    assert len(load_experts(tmp_path)) == 2


def test_another_config_in_the_same_folder_is_refused(tmp_path, digits):
    _train(dataclasses.replace(TINY, num_experts=1), tmp_path, digits)
    with pytest.raises(
        ValueError,
        match=r"expert_000.safetensors was made with another expert "
        r"config \(epochs: file has 3, expected 4\)",
    ):
        _train(dataclasses.replace(TINY, epochs=4), tmp_path, digits)


def test_loading_checks_architecture_keys_shapes_and_files(tmp_path, digits):
    _train(dataclasses.replace(TINY, num_experts=1), tmp_path, digits)
    path = expert_path(tmp_path, 0)
    arch = load_expert(path).config
    with pytest.raises(ValueError, match="another architecture: width: file has 8, expected 128"):
        load_expert(path, expect_config=dataclasses.replace(arch, width=128))
    with pytest.raises(ValueError, match="trained on 'digits', expected 'fashion-mnist'"):
        load_experts(tmp_path, expect_dataset="fashion-mnist")

    tensors, header = load_tensors(path)
    broken = tmp_path / "broken"
    damaged = dict(tensors)
    del damaged["epoch_002/features.4.bias"]
    damaged["epoch_001/features.0.weight"] = torch.zeros(8, 1, 5, 5)
    damaged["epoch_009/extra"] = torch.zeros(1)
    save_tensors(broken / "expert_000.safetensors", damaged, header)
    with pytest.raises(ValueError) as err:
        load_experts(broken)
    message = str(err.value)
    assert "missing epoch_002/features.4.bias" in message
    assert "unexpected epoch_009/extra" in message
    assert (
        "epoch_001/features.0.weight has shape (8, 1, 5, 5), the architecture needs (8, 1, 3, 3)"
        in message
    )

    truncated = tmp_path / "truncated" / "expert_000.safetensors"
    truncated.parent.mkdir()
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match="expert_000.safetensors is truncated"):
        load_experts(truncated.parent)
    with pytest.raises(FileNotFoundError, match=r"no expert files .* `tesla-func experts"):
        load_experts(tmp_path / "empty")


def test_mixed_folders_are_refused(tmp_path, digits):
    _train(dataclasses.replace(TINY, num_experts=1), tmp_path / "a", digits)
    _train(dataclasses.replace(TINY, num_experts=1, width=5), tmp_path / "b", digits)
    (tmp_path / "b" / "expert_000.safetensors").rename(tmp_path / "a" / "expert_001.safetensors")
    with pytest.raises(
        ValueError, match="expert_001.safetensors holds another architecture: width"
    ):
        load_experts(tmp_path / "a")


def test_config_validation():
    with pytest.raises(ValueError, match="running statistics"):
        ExpertConfig(norm="batch")
    with pytest.raises(ValueError, match="epochs must be None or a positive int"):
        ExpertConfig(epochs=0)


def test_an_expert_at_chance_is_warned_of_and_recorded(tmp_path, digits):
    from tesla_func.runchecks import RunWarning

    at_chance = dataclasses.replace(TINY, num_experts=1, epochs=1, lr=1e-6)
    with pytest.warns(RunWarning, match=r"expert 0 reached only .* \(chance: 10.0%\).*--epochs"):
        _train(at_chance, tmp_path / "weak", digits)
    (weak,) = load_experts(tmp_path / "weak")
    assert len(weak.header["warnings"]) == 1 and "--depth" in weak.header["warnings"][0]
    _train(dataclasses.replace(TINY, num_experts=1), tmp_path / "good", digits)
    (good,) = load_experts(tmp_path / "good")
    assert good.header["warnings"] == [] and good.test_accuracy[-1] > 0.2
