"""Released sets: a run's set copied under results/sets/ with its model card line, and the
README's "Use a distilled set" code run on one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tesla_func import cli
from tesla_func.release import CARD, main, release_set
from tesla_func.synthetic import load_synthetic

README = Path(__file__).resolve().parents[1] / "README.md"
README_SET = "results/sets/fashion-mnist-ipc10.safetensors"  # the set the README loads


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny distillation run on digits (1 image per class, 3 iterations)."""
    tmp = tmp_path_factory.mktemp("release")
    assert cli.main(["experts", "--dataset", "digits", "--num-experts", "1", "--epochs", "2",
                     "--width", "8", "--no-dsa", "--out", str(tmp / "experts"),
                     "--no-progress"]) == 0
    assert cli.main(["distill", "--experts-dir", str(tmp / "experts"), "--ipc", "1",
                     "--label-strategy", "sla", "--iterations", "3", "--syn-steps", "2",
                     "--match-epochs", "1", "--max-start-epoch", "1", "--eval-epochs", "2",
                     "--eval-models", "2", "--out", str(tmp / "run"), "--no-progress"]) == 0
    return tmp / "run"


def test_release_copies_the_set_and_writes_its_card_line(run, tmp_path):
    sets = tmp_path / "sets"
    out = release_set(run, "digits-ipc1", sets_dir=sets, allow_dirty=True)
    assert out == sets / "digits-ipc1.safetensors"
    assert out.read_bytes() == (run / "synthetic.safetensors").read_bytes()
    card = (sets / CARD).read_text()
    synthetic = load_synthetic(out)
    revision = synthetic.header["provenance"]["git_revision"]
    (line,) = [t for t in card.splitlines() if t.startswith("| `digits-ipc1` |")]
    from tesla_func.results import load_results

    log = load_results(run / "log.nc")
    accuracy = (f"{100 * float(log['eval_accuracy_mean'][-1]):.1f} ± "
                f"{100 * float(log['eval_accuracy_std'][-1]):.1f} %")
    for text in ("| digits | 1 | tesla, sla |", "3 iterations of T = 2 student steps",
                 f"`{revision}`", accuracy, "2 × ConvNet-3 width 8 (instance) trained 2 epochs",
                 f"lr {synthetic.lr:.3g}"):
        assert text in line, text
    assert card.startswith("# Distilled sets") and "| set | dataset | IPC |" in card

    # Released again: its line is replaced; another set adds one.
    release_set(run / "synthetic.safetensors", "digits-ipc1", sets_dir=sets, allow_dirty=True,
                accuracy="12.3 %", protocol="my protocol")
    assert main([str(run), "other", "--sets-dir", str(sets), "--allow-dirty"]) == 0
    rows = [t for t in (sets / CARD).read_text().splitlines() if t.startswith("| `")]
    assert [r.split(" | ")[0] for r in rows] == ["| `digits-ipc1`", "| `other`"]
    assert rows[0].endswith("| 12.3 % | my protocol |")


def test_release_refuses_what_it_cannot_vouch_for(run, tmp_path, capsys):
    synthetic = load_synthetic(run / "synthetic.safetensors")
    provenance = {**synthetic.header["provenance"], "git_revision": "abc123-dirty"}
    dirty = type(synthetic)(synthetic.images, synthetic.labels, synthetic.lr,
                            synthetic.label_logits, {**synthetic.header, "provenance": provenance})
    dirty.save(tmp_path / "dirty.safetensors")
    with pytest.raises(ValueError, match="revision 'abc123-dirty', not a commit"):
        release_set(tmp_path / "dirty.safetensors", "x", sets_dir=tmp_path / "sets")
    with pytest.raises(ValueError, match="no evaluation of .* pass accuracy="):
        release_set(tmp_path / "dirty.safetensors", "x", sets_dir=tmp_path / "sets",
                    allow_dirty=True)
    with pytest.raises(ValueError, match="set name 'a/b'"):
        release_set(run, "a/b", sets_dir=tmp_path / "sets", allow_dirty=True)
    assert main([str(tmp_path / "absent"), "x", "--sets-dir", str(tmp_path / "sets")]) == 1
    assert "release: error: no such file" in capsys.readouterr().err
    assert not (tmp_path / "sets").exists()


def _readme_code() -> list[str]:
    """The Python blocks of the README's section "Use a distilled set"."""
    text = README.read_text()
    section = text.split("## Use a distilled set\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2 and all(README_SET in b for b in blocks)
    return blocks


def test_the_readmes_use_a_distilled_set_code_runs(run, tmp_path, capsys):
    released = release_set(run, "digits-ipc1", sets_dir=tmp_path, allow_dirty=True)
    for code in _readme_code():
        scope: dict = {}
        exec(compile(code.replace(README_SET, str(released)), "README.md", "exec"), scope)
        if "result" in scope:
            assert scope["result"].config.lr == load_synthetic(released).lr
            assert len(scope["result"].accuracies) == 3
        else:
            assert 0 <= float(scope["accuracy"]) <= 1
    assert "over 3 convnet models" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not (README.parent / README_SET).is_file(),
                    reason=f"{README_SET} is not released yet")
def test_the_readme_code_runs_on_the_released_set(monkeypatch):
    monkeypatch.chdir(README.parent)
    for code in _readme_code():
        exec(compile(code, "README.md", "exec"), {})
