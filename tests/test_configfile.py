"""Config files: the TOML writer round-trips, ``--config`` takes every option by name with the
flags' checks (flags win), and a run folder's config.toml reruns the run bitwise."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tesla_func import cli
from tesla_func.configfile import (
    ConfigFileError,
    config_file_values,
    parse_args,
    to_toml,
    tomllib,
    write_config_toml,
)
from tesla_func.distill_config import DistillConfig
from tesla_func.evaluate import EvalConfig
from tesla_func.experts import ExpertConfig, load_experts
from tesla_func.planner import PlanConfig
from tesla_func.synthetic import load_synthetic

# ---------------------------------------------------------------------------------------------
# Writing


def _same(a: object, b: object) -> bool:
    """Equal, NaN equal to NaN, tuples read back as lists."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        a = {k: v for k, v in a.items() if v is not None}
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1),
                     st.floats(allow_nan=True, allow_infinity=True), _text)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
_tables = st.recursive(
    st.dictionaries(_text, st.one_of(_values, st.none()), max_size=5),
    lambda inner: st.dictionaries(_text, st.one_of(_values, inner), max_size=4),
    max_leaves=12,
)


@given(_tables)
def test_toml_round_trips_any_config_dict(table):
    assert _same(table, tomllib.loads(to_toml(table)))


def test_toml_values_that_need_care():
    table = {"inf": math.inf, "ninf": -math.inf, "nan": math.nan, "tiny": 5e-324,
             "big": 1e300, "int_float": 1000.0, "quote": 'a"b\\c\nd\te\x7f\x01', "none": None,
             "tuple": (1, 2.5), "empty": {}, "key with space": 1, "nested": {"deep": {"x": 1}},
             "inline": [{"a": 1, "b": None}], "unicode": "Ω😀"}
    text = to_toml(table, comment="first line\nsecond line")
    assert text.startswith("# first line\n# second line\n") and "none" not in text
    back = tomllib.loads(text)
    assert _same(table, back) and back["inline"] == [{"a": 1}]
    assert back["int_float"] == 1000.0 and isinstance(back["int_float"], float)
    with pytest.raises(TypeError, match="cannot write"):
        to_toml({"x": object()})
    with pytest.raises(ValueError, match="cannot hold None"):
        to_toml({"x": [1, None]})


@pytest.mark.parametrize("cfg_type", [DistillConfig, ExpertConfig, EvalConfig, PlanConfig])
def test_a_field_that_can_be_none_defaults_to_none(cfg_type):
    """TOML has no null: config.toml leaves None out, which must read back as the default."""
    hints = typing.get_type_hints(cfg_type)
    for field in dataclasses.fields(cfg_type):
        if type(None) in typing.get_args(hints[field.name]):
            assert getattr(cfg_type(), field.name) is None, field.name


def test_written_distill_config_reads_back_as_the_same_config(tmp_path):
    cfg = DistillConfig(experts_dir="e", ipc=3, lr_grad_clip=0.5, lr_img=123.25, dsa=False)
    path = write_config_toml(tmp_path / "config.toml", cfg.to_dict())
    args = parse_args(cli.build_parser(), ["distill", "--config", str(path), "--out", "x"])
    assert cli.config_from_args(args, DistillConfig) == cfg


# ---------------------------------------------------------------------------------------------
# Reading into a command line


def _parse(tmp_path, text, argv):
    (tmp_path / "c.toml").write_text(text)
    return parse_args(cli.build_parser(), [argv[0], "--config", str(tmp_path / "c.toml"),
                                           *argv[1:]])


def test_keys_are_the_options_and_flags_given_win(tmp_path):
    text = ('ipc = 4\nlr-img = 50\nmethod = "exact"\ndsa = false\nout = "run"\n'
            'experts_dir = "e"\nprogress = false\n')
    args = _parse(tmp_path, text, ["distill", "--ipc", "2"])
    cfg = cli.config_from_args(args, DistillConfig)
    assert (cfg.ipc, cfg.lr_img, cfg.method, cfg.dsa) == (2, 50.0, "exact", False)
    assert isinstance(cfg.lr_img, float) and args.out == "run" and args.progress is False
    args = _parse(tmp_path, text, ["distill", "--dsa", "--out", "other"])  # --out not required
    assert cli.config_from_args(args, DistillConfig).dsa is True and args.out == "other"


def test_nested_tables_and_flattened_flags(tmp_path):
    # plan flattens the run's fields: --ipc sets distill.ipc; the alias --method sets methods
    args = _parse(tmp_path, 'ipc = 7\nmethod = ["exact"]\ndataset = "digits"\n', ["plan"])
    plan = cli.config_from_args(args, PlanConfig)
    assert plan.distill.ipc == 7 and plan.methods == ("exact",) and plan.distill.dataset == "digits"
    args = _parse(tmp_path, '[distill]\nipc = 5\nlabel-strategy = "sla"\n', ["plan"])
    plan = cli.config_from_args(args, PlanConfig)
    assert plan.distill.ipc == 5 and plan.distill.label_strategy == "sla"
    with pytest.raises(SystemExit):
        _parse(tmp_path, 'ipc = 7\n[distill]\nipc = 5\n', ["plan"])


def test_bad_keys_and_values_are_named(tmp_path, capsys):
    cases = {
        "ipcs = 3\n": ["unknown key 'ipcs'; the keys known are: ", "ipc", "lr_img"],
        "ipc = 1.5\n": ["key 'ipc' must be an integer (as --ipc takes), got float 1.5"],
        "lr_img = true\n": ["key 'lr_img' must be a number"],
        'dsa = "yes"\n': ["key 'dsa' is a switch: true or false"],
        "[method]\nx = 1\n": ["key 'method' must be a string"],
        "ipc = \n": ["is not TOML"],
    }
    parser = cli.build_parser()
    target = parser._subparsers._group_actions[0].choices["distill"]
    for text, messages in cases.items():
        (tmp_path / "c.toml").write_text(text)
        with pytest.raises(ConfigFileError) as err:
            config_file_values(target, tmp_path / "c.toml")
        assert str(err.value).startswith(f"config file {tmp_path / 'c.toml'}")
        for message in messages:
            assert message in str(err.value), (text, str(err.value))
    # the config's own validation, as for the flags
    (tmp_path / "c.toml").write_text('method = "fast"\n')
    assert cli.main(["distill", "--config", str(tmp_path / "c.toml"), "--out", "x"]) == 1
    assert "DistillConfig.method 'fast' is unknown; known:" in capsys.readouterr().err
    # through the command line: argparse's error, status 2
    (tmp_path / "c.toml").write_text("ipcs = 3\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["distill", "--config", str(tmp_path / "c.toml")])
    assert exit_.value.code == 2
    assert "tesla-func distill: error: config file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["distill", "--config", str(tmp_path / "absent.toml")])
    assert "does not exist" in capsys.readouterr().err
    # choices of a plain option; a table for nested configs only
    (tmp_path / "c.toml").write_text('format = "yaml"\n')
    with pytest.raises(ConfigFileError, match="'yaml' is not one of 'markdown', 'json'"):
        config_file_values(parser._subparsers._group_actions[0].choices["plan"],
                           tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text("[distill]\nbogus = 1\n")
    with pytest.raises(ConfigFileError, match=r"unknown key 'distill.bogus'; the keys known in "
                                              r"\[distill\] are: batch_syn"):
        config_file_values(parser._subparsers._group_actions[0].choices["plan"],
                           tmp_path / "c.toml")


def test_an_exclusive_flag_given_drops_the_files_other(tmp_path):
    text = 'synthetic = "run/synthetic.safetensors"\nepochs = 7\n'
    args = _parse(tmp_path, text, ["evaluate"])
    assert args.synthetic == "run/synthetic.safetensors" and args.random_real is None
    args = _parse(tmp_path, text, ["evaluate", "--random-real", "10"])
    assert args.synthetic is None and args.random_real == 10 and args.epochs == 7


def test_every_command_takes_a_config_file(tmp_path):
    parser = cli.build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        assert any(a.dest == "config" for a in sub._actions), name


def test_experiments_take_a_config_file(tmp_path):
    from tesla_func.experiment import parse_config

    @dataclasses.dataclass(frozen=True)
    class Tiny:
        experts: ExpertConfig = ExpertConfig(epochs=3)
        distill: DistillConfig = DistillConfig(lr_grad_clip=0.5)
        ipcs: tuple[int, ...] = (1, 10)

    (tmp_path / "c.toml").write_text(
        'ipcs = [2, 3]\ndistill.lr_img = 7\n[experts]\nnum-experts = 4\n')
    cfg = parse_config(Tiny, {"paper": Tiny(ipcs=(50,))}, "",
                       ["--config", str(tmp_path / "c.toml"), "--experts.num-experts", "6"])
    assert cfg.ipcs == (2, 3) and cfg.distill.lr_img == 7.0 and cfg.experts.num_experts == 6
    assert cfg.experts.epochs == 3 and cfg.distill.lr_grad_clip == 0.5
    (tmp_path / "p.toml").write_text('preset = "paper"\n')
    assert parse_config(Tiny, {"paper": Tiny(ipcs=(50,))}, "",
                        ["--config", str(tmp_path / "p.toml")]).ipcs == (50,)
    # a saved experiment config (nested tables) reads back as the same config
    write_config_toml(tmp_path / "saved.toml", dataclasses.asdict(cfg))
    assert parse_config(Tiny, {}, "", ["--config", str(tmp_path / "saved.toml")]) == cfg


# ---------------------------------------------------------------------------------------------
# Run folders


def test_rerunning_a_run_folders_config_toml_gives_the_same_set_bitwise(tmp_path, capsys):
    """Experts and a distillation from flags; then both again from the config.toml their
    folders kept: bitwise the same experts and the same set (CPU, one thread)."""
    experts = tmp_path / "experts"
    assert cli.main(["experts", "--dataset", "digits", "--num-experts", "1", "--epochs", "2",
                     "--width", "8", "--no-dsa", "--out", str(experts), "--no-progress"]) == 0
    saved = tomllib.loads((experts / "config.toml").read_text())
    assert saved["width"] == 8 and saved["dsa"] is False and "zca" not in saved  # None: omitted
    again = tmp_path / "experts2"
    assert cli.main(["experts", "--config", str(experts / "config.toml"), "--out", str(again),
                     "--no-progress"]) == 0
    (a,), (b,) = load_experts(experts), load_experts(again)
    assert a.header["expert_config"] == b.header["expert_config"]
    assert all(torch.equal(p[k], q[k]) for p, q in zip(a.params, b.params) for k in p)

    run = tmp_path / "run"
    assert cli.main(["distill", "--experts-dir", str(experts), "--ipc", "1", "--method", "exact",
                     "--label-strategy", "learned", "--iterations", "3", "--syn-steps", "2",
                     "--match-epochs", "1", "--max-start-epoch", "1", "--lr-grad-clip", "0.5",
                     "--eval-epochs", "1", "--eval-models", "1", "--out", str(run),
                     "--no-progress"]) == 0
    text = (run / "config.toml").read_text()
    assert text.startswith("# tesla_func DistillConfig") and "lr_init" not in text
    rerun = tmp_path / "rerun"
    assert cli.main(["distill", "--config", str(run / "config.toml"), "--out", str(rerun),
                     "--no-progress"]) == 0
    assert (rerun / "config.toml").read_text() == text
    first, second = load_synthetic(run / "synthetic.safetensors"), load_synthetic(
        rerun / "synthetic.safetensors")
    assert first.header["config"] == second.header["config"]
    for name in ("images", "labels", "label_logits"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert first.lr == second.lr
