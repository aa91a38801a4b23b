"""The command line builds a config, calls the library, and reports errors without a traceback."""

from __future__ import annotations

import argparse

import pytest
import torch

from tesla_func import cli
from tesla_func.configargs import config_from_args
from tesla_func.data import DATASETS, ENV_VAR
from tesla_func.experts import ExpertConfig, load_experts


def test_data_lists_every_dataset_and_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert cli.main(["data", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("fashion-mnist", "digits", "cifar10", "cifar100", "imagenet64"):
        assert name in out
    assert "digits         found" in out
    assert f"cifar10        missing  looked in: {tmp_path}" in out
    assert "apt-get install dataset-fashion-mnist" in out


def test_experts_builds_the_config_and_trains(tmp_path, capsys):
    out_dir = tmp_path / "experts"
    argv = [
        "experts",
        "--dataset",
        "digits",
        "--num-experts",
        "1",
        "--epochs",
        "2",
        "--width",
        "6",
        "--depth",
        "2",
        "--lr",
        "0.1",
        "--batch-size",
        "128",
        "--no-dsa",
        "--seed",
        "3",
        "--no-progress",
        "--out",
        str(out_dir),
    ]
    assert cli.main(argv) == 0
    assert "1 experts in" in capsys.readouterr().out
    (expert,) = load_experts(out_dir)
    assert expert.config.width == 6 and expert.config.depth == 2 and expert.epochs == 2
    written = expert.header["expert_config"]
    assert written["dsa"] is False and written["seed"] == 3 and written["batch_size"] == 128
    assert written["zca"] is None and expert.lr == 0.1


def test_booleans_are_flags_not_strings():
    parser = cli.build_parser()
    on = config_from_args(parser.parse_args(["experts", "--out", "x"]), ExpertConfig)
    off = config_from_args(parser.parse_args(["experts", "--out", "x", "--no-dsa", "--zca"]),
                           ExpertConfig)
    assert on.dsa is True and on.zca is None and off.dsa is False and off.zca is True
    for action in parser._subparsers._group_actions[0].choices["experts"]._actions:
        assert action.type is not bool, action.dest


def test_errors_are_reported_not_raised(tmp_path, capsys):
    status = cli.main(
        [
            "experts",
            "--dataset",
            "fashion-mnist",
            "--root",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert status == 1
    err = capsys.readouterr().err
    assert "tesla-func experts: error: dataset 'fashion-mnist' not found" in err
    assert str(tmp_path) in err and "apt-get install dataset-fashion-mnist" in err
    assert cli.main(["experts", "--dataset", "mnist3d", "--out", "o"]) == 1
    assert "ExpertConfig.dataset 'mnist3d' is unknown; known: [" in capsys.readouterr().err


def test_a_new_command_is_one_entry():
    seen = []
    commands = {
        **cli.COMMANDS,
        "hello": cli.Command(
            "say hello", lambda p: p.add_argument("--name"), lambda a: seen.append(a.name) or 0
        ),
    }
    args = cli.build_parser(commands).parse_args(["hello", "--name", "x"])
    assert commands[args.command].run(args) == 0 and seen == ["x"]
    assert isinstance(cli.build_parser(), argparse.ArgumentParser)


def test_distill_then_evaluate_from_the_command_line(tmp_path, capsys):
    experts = tmp_path / "experts"
    assert cli.main(["experts", "--dataset", "digits", "--num-experts", "1", "--epochs", "2",
                     "--width", "8", "--no-dsa", "--out", str(experts), "--no-progress"]) == 0
    run = tmp_path / "run"
    argv = ["distill", "--experts-dir", str(experts), "--dataset", "digits", "--ipc", "1",
            "--method", "exact", "--label-strategy", "learned", "--iterations", "2",
            "--syn-steps", "2", "--state-stride", "2",
            "--match-epochs", "1", "--max-start-epoch", "1", "--eval-epochs", "2",
            "--eval-models", "1", "--no-dsa", "--out", str(run), "--no-progress"]
    assert cli.main(argv) == 0
    assert "synthetic set:" in capsys.readouterr().out
    from tesla_func.synthetic import load_synthetic

    synthetic = load_synthetic(run / "synthetic.safetensors")
    written = synthetic.header["config"]
    assert written["method"] == "exact" and written["state_stride"] == 2
    assert written["label_strategy"] == "learned" and written["dsa"] is False
    out_nc = tmp_path / "eval.nc"
    assert cli.main(["evaluate", "--synthetic", str(run / "synthetic.safetensors"), "--epochs",
                     "2", "--num-models", "2", "--width", "8", "--no-progress",
                     "--out", str(out_nc)]) == 0
    assert "test accuracy:" in capsys.readouterr().out
    from tesla_func.results import load_results

    ds = load_results(out_nc)
    assert ds.sizes["model"] == 2 and ds.attrs["config"]["lr"] == pytest.approx(synthetic.lr)
    assert cli.main(["evaluate", "--random-real", "1", "--dataset", "digits", "--epochs", "1",
                     "--num-models", "1", "--width", "8", "--no-progress"]) == 0


def test_distill_reports_bad_setup_without_traceback(tmp_path, capsys):
    status = cli.main(["distill", "--experts-dir", str(tmp_path / "none"), "--out",
                       str(tmp_path / "run")])
    assert status == 1
    assert "no expert files" in capsys.readouterr().err


def test_help_reads_as_the_configs_documentation(capsys):
    for command, phrase in (("distill", "T, student steps per iteration"),
                            ("experts", "epochs"), ("evaluate", "K independently initialised")):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert phrase in text, (command, text[:400])
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr-grad-clip" in text and "is clipped to this before the update" in text
    assert "(default: 'exact')" in text  # the method flag shows its default


def test_folder_of_pngs_end_to_end_from_the_command_line(tmp_path, capsys):
    from PIL import Image

    from tesla_func.synthetic import load_synthetic
    from tests.test_data import write_folder

    root = tmp_path / "images"
    write_folder(root, size=(12, 12))  # ant, bee, cat: 6 PNGs each, 5 train + 1 test
    experts, run = tmp_path / "experts", tmp_path / "run"
    assert cli.main(["experts", "--dataset", "folder", "--root", str(root), "--image-size", "8",
                     "--num-experts", "1", "--epochs", "2", "--width", "4", "--batch-size", "8",
                     "--no-dsa", "--out", str(experts), "--no-progress"]) == 0
    (expert,) = load_experts(experts)
    assert expert.config.image_size == 8 and expert.header["expert_config"]["image_size"] == 8
    info = expert.header["dataset_info"]
    assert info["class_names"] == ["ant", "bee", "cat"] and info["source"] == str(root)
    distill = ["distill", "--experts-dir", str(experts), "--ipc", "2", "--iterations", "2",
               "--syn-steps", "2", "--match-epochs", "1", "--max-start-epoch", "1",
               "--eval-epochs", "1", "--eval-models", "1", "--label-strategy", "sla",
               "--no-progress"]
    assert cli.main([*distill, "--data-root", str(root), "--out", str(run)]) == 0
    synthetic = load_synthetic(run / "synthetic.safetensors")
    assert synthetic.images.shape == (6, 3, 8, 8) and synthetic.labels.shape == (6, 3)
    assert (run / "synthetic.png").is_file()
    # evaluate finds the folder where the set's header says it was read, at the same size
    assert cli.main(["evaluate", "--synthetic", str(run / "synthetic.safetensors"), "--epochs",
                     "1", "--num-models", "1", "--width", "4", "--no-progress"]) == 0
    assert "test accuracy:" in capsys.readouterr().out
    (run / "synthetic.png").unlink()
    assert cli.main(["show", str(run / "synthetic.safetensors")]) == 0  # beside the file
    assert cli.main(["show", str(run / "synthetic.safetensors"), "--out",
                     str(tmp_path / "mine.png")]) == 0
    for png in (run / "synthetic.png", tmp_path / "mine.png"):
        assert Image.open(png).format == "PNG"
    assert f"wrote {tmp_path / 'mine.png'}" in capsys.readouterr().out

    # Not enough images for the IPC: the error names the class.
    assert cli.main([*distill, "--ipc", "6", "--out", str(tmp_path / "r6")]) == 1
    # (6 images: 1 test, 1 validation, 4 to train on)
    assert "ipc 6 is larger than class 0 ('ant'), which has 4" in capsys.readouterr().err
    # Experts of one folder do not distil another: other classes, or another place.
    other = tmp_path / "other"
    write_folder(other, classes=("dog", "eel", "fox"), size=(12, 12))
    assert cli.main([*distill, "--data-root", str(other), "--out", str(tmp_path / "r2")]) == 1
    err = capsys.readouterr().err
    assert "was made from another dataset" in err and "['ant', 'bee', 'cat'] there" in err
    copy = tmp_path / "copy"
    write_folder(copy, size=(12, 12))
    assert cli.main([*distill, "--data-root", str(copy), "--out", str(tmp_path / "r3")]) == 1
    assert f"read from {root} there, from {copy} here" in capsys.readouterr().err
    # image_size belongs to your own images only.
    assert cli.main(["experts", "--dataset", "digits", "--image-size", "8", "--out",
                     str(tmp_path / "e2")]) == 1
    assert "ExpertConfig.image_size is for your own images" in capsys.readouterr().err


def test_show_refuses_files_that_are_not_synthetic_sets(tmp_path, capsys):
    import torch

    from tesla_func.fileio import save_tensors

    save_tensors(tmp_path / "expert.safetensors", {"x": torch.zeros(2)},
                 {"format": "tesla_func.expert"})
    assert cli.main(["show", str(tmp_path / "expert.safetensors")]) == 1
    assert "is not a tesla_func synthetic set" in capsys.readouterr().err
    (tmp_path / "notes.safetensors").write_text("hello")
    assert cli.main(["show", str(tmp_path / "notes.safetensors")]) == 1
    assert "truncated or not a tesla_func safetensors file" in capsys.readouterr().err
    assert cli.main(["show", str(tmp_path / "absent.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.slow
def test_installed_entry_point_killed_and_rerun_ends_bitwise_as_an_uninterrupted_run(tmp_path):
    """The ``tesla-func`` script (pip install -e . puts it on PATH) in real processes: a distill
    killed with SIGKILL once its first checkpoint is on disk, then the same command again, ends
    with bitwise the set that the same command, run without interruption, makes."""
    import os
    import shutil
    import signal
    import subprocess
    import time
    from pathlib import Path

    import torch

    from tesla_func.fileio import load_tensors
    from tesla_func.synthetic import load_synthetic

    script = shutil.which("tesla-func")
    assert script, "the tesla-func entry point is not on PATH: run pip install -e ."
    root = Path(__file__).resolve().parents[1]
    # This checkout's code (an editable install may point at another one), and one torch thread
    # as in this process (the tests run single-threaded): bitwise equality needs the same count.
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    assert torch.get_num_threads() == 1
    experts = tmp_path / "experts"
    assert cli.main(["experts", "--dataset", "digits", "--num-experts", "1", "--epochs", "2",
                     "--width", "8", "--no-dsa", "--out", str(experts), "--no-progress"]) == 0
    iterations = 8  # 0.2 s each here, with a checkpoint each: about a second to kill it mid-run

    def arguments(out):
        return ["distill", "--experts-dir", str(experts), "--ipc", "1", "--method", "exact",
                "--label-strategy", "learned", "--iterations", str(iterations),
                "--syn-steps", "2", "--match-epochs", "1", "--max-start-epoch", "1",
                "--save-every", "1", "--eval-epochs", "1", "--eval-models", "1",
                "--out", str(out), "--no-progress"]

    killed = subprocess.Popen([script, *arguments(tmp_path / "killed")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "killed" / "checkpoint.safetensors"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    _, err = killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL, f"it ended before it was killed: {err[-2000:]}"
    assert not (tmp_path / "killed" / "synthetic.safetensors").exists()
    _, header = load_tensors(checkpoint)  # written atomically: whole, whenever the kill came
    assert 1 <= header["iteration"] < iterations, header["iteration"]

    rerun = subprocess.Popen([script, *arguments(tmp_path / "killed")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert cli.main(arguments(tmp_path / "full")) == 0  # meanwhile: the uninterrupted run
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert "synthetic set:" in out and "0 skipped updates" in out
    a = load_synthetic(tmp_path / "killed" / "synthetic.safetensors")
    b = load_synthetic(tmp_path / "full" / "synthetic.safetensors")
    assert a.header["iteration"] == b.header["iteration"] == iterations
    for name in ("images", "labels", "label_logits"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x, y), f"{name} differ by up to {float((x - y).abs().max())}"
    assert a.lr == b.lr


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr that names the fix, status 1, nothing written or lost


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Tiny digits experts and a 2-iteration set distilled from them (width 4, depth 2)."""
    folder = tmp_path_factory.mktemp("tiny")
    experts, run = folder / "experts", folder / "run"
    assert cli.main(["experts", "--dataset", "digits", "--num-experts", "1", "--epochs", "2",
                     "--width", "4", "--depth", "2", "--no-dsa", "--out", str(experts),
                     "--no-progress"]) == 0
    assert cli.main(["distill", "--experts-dir", str(experts), "--iterations", "2",
                     "--syn-steps", "2", "--match-epochs", "1", "--max-start-epoch", "1",
                     "--eval-epochs", "1", "--eval-models", "1", "--out", str(run),
                     "--no-progress"]) == 0
    return experts, run


def _one_line_error(capsys, *phrases: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "Warning" not in line and line.strip()
             and not line.startswith("  warn")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def test_experts_with_a_non_finite_lr_is_refused(tmp_path, capsys):
    for lr in ("inf", "nan", "0"):
        out = tmp_path / f"lr-{lr}"
        assert cli.main(["experts", "--dataset", "digits", "--lr", lr, "--out", str(out)]) == 1
        _one_line_error(capsys, "ExpertConfig.lr must be finite and > 0", "--lr")
        assert not out.exists()


def test_experts_that_diverge_stop_with_the_fix(tmp_path, capsys):
    out = tmp_path / "e"
    assert cli.main(["experts", "--dataset", "digits", "--lr", "1e30", "--num-experts", "1",
                     "--epochs", "2", "--out", str(out), "--no-progress"]) == 1
    _one_line_error(capsys, "expert 0 diverged in epoch 1", "smaller --lr")
    assert not list(out.glob("expert_*.safetensors"))


def test_a_folder_dataset_of_one_class_is_refused(tmp_path, capsys):
    from tests.test_data import write_folder

    write_folder(tmp_path / "images", classes=("ant",), size=(8, 8))
    out = tmp_path / "e"
    assert cli.main(["experts", "--dataset", "folder", "--root", str(tmp_path / "images"),
                     "--out", str(out)]) == 1
    _one_line_error(capsys, "has 1 class (ant)", "at least 2")
    assert not out.exists()


def test_out_naming_a_file_is_refused(tmp_path, capsys, tiny_run):
    experts, _ = tiny_run
    afile = tmp_path / "a-file"
    afile.write_text("mine")
    assert cli.main(["experts", "--dataset", "digits", "--out", str(afile)]) == 1
    _one_line_error(capsys, f"--out {afile} is a file, not a folder")
    assert cli.main(["distill", "--experts-dir", str(experts), "--out", str(afile)]) == 1
    _one_line_error(capsys, f"--out {afile} is a file, not a folder")
    assert afile.read_text() == "mine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_torch_cannot_use_is_refused(tmp_path, capsys, tiny_run):
    experts, run = tiny_run
    out = tmp_path / "o"
    for argv in (
        ["experts", "--dataset", "digits", "--device", "cuda", "--out", str(out)],
        ["distill", "--experts-dir", str(experts), "--device", "cuda", "--out", str(out)],
        ["evaluate", "--synthetic", str(run / "synthetic.safetensors"), "--device", "cuda"],
    ):
        assert cli.main(argv) == 1, argv
        _one_line_error(capsys, "device 'cuda'", "--device cpu")
    assert not out.exists()


def test_show_out_naming_a_folder_is_refused(tmp_path, capsys, tiny_run):
    _, run = tiny_run
    assert cli.main(["show", str(run / "synthetic.safetensors"), "--out", str(tmp_path)]) == 1
    _one_line_error(capsys, f"--out {tmp_path} is a folder", str(tmp_path / "synthetic.png"))


@pytest.mark.parametrize("flag", ["--width", "--depth", "--random-real"])
def test_evaluate_refuses_sizes_below_one(flag, capsys, tiny_run):
    _, run = tiny_run
    what = (["--synthetic", str(run / "synthetic.safetensors")] if flag != "--random-real"
            else ["--dataset", "digits"])
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", *what, flag, "0"])
    assert stop.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_evaluate_trains_the_sets_own_network_unless_told(tmp_path, capsys, tiny_run):
    from tesla_func.results import load_results

    _, run = tiny_run
    base = ["evaluate", "--synthetic", str(run / "synthetic.safetensors"), "--epochs", "1",
            "--num-models", "1", "--no-progress"]
    assert cli.main([*base, "--out", str(tmp_path / "own.nc")]) == 0
    own = load_results(tmp_path / "own.nc").attrs["config"]["arch_kwargs"]
    assert own == {"width": 4, "depth": 2, "norm": "instance"}
    assert cli.main([*base, "--depth", "1", "--width", "3", "--norm", "none", "--out",
                     str(tmp_path / "told.nc")]) == 0
    told = load_results(tmp_path / "told.nc").attrs["config"]["arch_kwargs"]
    assert told == {"width": 3, "depth": 1, "norm": "none"}


def test_evaluate_random_real_needs_its_dataset(capsys):
    assert cli.main(["evaluate", "--random-real", "2"]) == 1
    _one_line_error(capsys, "--random-real needs --dataset")


def test_evaluate_random_real_trains_the_datasets_default_network(tmp_path, capsys):
    from tesla_func.results import load_results

    assert cli.main(["evaluate", "--random-real", "1", "--dataset", "digits", "--epochs", "1",
                     "--num-models", "1", "--no-progress", "--out", str(tmp_path / "r.nc")]) == 0
    kwargs = load_results(tmp_path / "r.nc").attrs["config"]["arch_kwargs"]
    assert kwargs == {"width": 32, "depth": 2}  # digits' defaults: 8x8 images take 2 blocks


@pytest.mark.parametrize("argv", [
    ["experts", "--dataset", "fashion-mnist", "--root", "{tmp}/nothing-here"],
    ["experts", "--dataset", "digits", "--depth", "4"],  # 8x8 images cannot take 4 pools
    ["experts", "--dataset", "digits", "--lr", "-1"],
    ["distill", "--experts-dir", "{tmp}/no-experts"],
    ["distill", "--experts-dir", "{experts}", "--max-start-epoch", "5"],
])
def test_a_failed_check_leaves_no_output_folder(argv, tmp_path, capsys, tiny_run):
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path, experts=tiny_run[0]) for a in argv]
    assert cli.main([*argv, "--out", str(out), "--no-progress"]) == 1
    _one_line_error(capsys)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Help


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return dict(parser._subparsers._group_actions[0].choices)


def test_every_flag_of_every_command_says_what_it_does():
    for name, parser in _subparsers().items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                text = (action.help or "").strip()
                assert text and not text.startswith("default:"), (name, action.option_strings)


def test_choice_flags_list_their_choices():
    from tesla_func.labels import LABEL_STRATEGIES
    from tesla_func.matching import METHODS
    from tesla_func.models import ARCHITECTURES

    expected = {
        ("distill", "--method"): METHODS, ("distill", "--label-strategy"): LABEL_STRATEGIES,
        ("distill", "--dataset"): DATASETS, ("experts", "--dataset"): DATASETS,
        ("evaluate", "--arch"): ARCHITECTURES, ("experts", "--norm"): ("instance", "none"),
        ("evaluate", "--norm"): ("instance", "batch", "none"), ("plan", "--method"): METHODS,
        ("plan", "--model"): ARCHITECTURES,
    }
    parsers = _subparsers()
    for (command, flag), choices in expected.items():
        (action,) = [a for a in parsers[command]._actions if flag in a.option_strings]
        listed = " ".join((action.help or "").split()) + " " + str(action.choices)
        for choice in choices:
            assert choice in listed, (command, flag, choice)


def test_no_help_text_is_a_fragment_of_a_comment():
    """A field's help is its whole comment: brackets balance, and it does not stop mid-phrase
    (a comment that runs on below its field's line is read as the next field's)."""
    for name, parser in _subparsers().items():
        for action in parser._actions:
            text = " ".join((action.help or "").split())
            assert text.count("(") == text.count(")"), (name, action.option_strings, text)
            assert text.count("[") == text.count("]"), (name, action.option_strings, text)
            doc = text.split(" (one of:")[0].split(" (default:")[0]
            assert not doc.endswith((",", "(", " a", " the", " of", " and", " or", " per")), (
                name, action.option_strings, text)


def test_a_required_field_does_not_show_a_default():
    (action,) = [a for a in _subparsers()["distill"]._actions
                 if "--experts-dir" in a.option_strings]
    assert "(required)" in action.help and "default" not in action.help


def test_importing_the_cli_loads_no_plotting_tables_or_kornia():
    """`tesla-func --help` builds every command's flags, so whatever `tesla_func.cli` imports is
    paid before any work: seaborn, matplotlib, xarray, pandas and kornia (2.3 s together) are
    imported only where they are used."""
    import subprocess
    import sys

    heavy = ("seaborn", "matplotlib", "xarray", "pandas", "kornia", "scipy")
    code = ("import sys, tesla_func.cli; "
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []
