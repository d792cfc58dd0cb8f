"""The CLI's front door: ``--json`` (one JSON line on stdout, logs on stderr), the help texts,
``config --schema`` and the shipped configs. No training: the run functions are replaced."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

import ffa_jax.run
from ffa_jax import cli, xla_options
from ffa_jax.config import (
    LORA_MODES,
    SHIPPED_CONFIGS,
    load_config,
    load_pretrain_config,
    shipped_configs,
)

ROOT = Path(__file__).resolve().parents[2]


def _one_json_line(text: str):
    lines = text.splitlines()
    assert len(lines) == 1, text
    return json.loads(lines[0])


def test_config_json_prints_the_resolved_config(capsys):
    assert cli.main(["config", "--json", "--set", "federated.rounds=7"]) == 0
    out, err = capsys.readouterr()
    got = _one_json_line(out)
    assert got == load_config(cli.default_config_path(), ["federated.rounds=7"]).to_dict()
    assert got["federated"]["rounds"] == 7


def test_train_json_keeps_stdout_machine_readable(capsys, monkeypatch, tmp_path):
    def fake_train(cfg, *, overwrite, resume, progress):
        print("round 1: a log line")  # what train's log=print writes
        return {"run_dir": str(tmp_path / cfg.name), "epsilon": 6.0, "rounds": 1}

    monkeypatch.setattr(ffa_jax.run, "train", fake_train)
    monkeypatch.setattr(xla_options, "enable_compilation_cache", lambda *a: None)
    assert cli.main(["train", "--json", "--no-progress", "--set", "name=x"]) == 0
    out, err = capsys.readouterr()
    assert _one_json_line(out) == {"run_dir": str(tmp_path / "x"), "epsilon": 6.0, "rounds": 1}
    assert "round 1: a log line" in err
    # Without --json the log stays on stdout, followed by the indented summary.
    assert cli.main(["train", "--no-progress", "--set", "name=x"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("round 1: a log line\n{\n")


def test_json_errors_go_to_stderr_with_exit_2(capsys):
    assert cli.main(["config", "--json", "--set", "federated.rounds=0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "federated.rounds" in err


@pytest.mark.parametrize(
    "command", ["train", "pretrain", "privacy", "audit", "config", "eval", "export-peft"]
)
def test_json_flag_is_offered(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert "--json" in capsys.readouterr().out


def test_config_schema_lists_every_field_with_type_default_choices_and_help(capsys):
    assert cli.main(["config", "--schema", "--json"]) == 0
    schema = _one_json_line(capsys.readouterr().out)
    train = schema["train"]["fields"]
    cfg = load_config(None).to_dict()
    flat = {
        f"{s}.{k}" if isinstance(v, dict) else s: (x if isinstance(v, dict) else v)
        for s, v in cfg.items()
        for k, x in (v.items() if isinstance(v, dict) else [(None, v)])
    }
    assert set(train) == set(flat)
    assert train["lora.mode"]["choices"] == list(LORA_MODES)
    assert train["lora.mode"]["default"] == "ffa" and train["lora.mode"]["type"] == "str"
    assert train["privacy.epsilon"]["type"] == "float" and train["privacy.epsilon"]["help"]
    assert all(entry["help"] for entry in train.values()), "every field has a description"
    assert "optim.learning_rate" in schema["pretrain"]["fields"]
    with pytest.raises(SystemExit):
        cli.main(["config", "--help"])
    assert "--schema" in capsys.readouterr().out


def test_schema_refuses_a_config_it_would_ignore(capsys):
    assert cli.main(["config", "--schema", "--set", "lora.rank=4"]) == 2
    assert "--schema" in capsys.readouterr().err


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return capsys.readouterr().out


def test_pretrain_help_names_its_own_default_config(capsys):
    text = " ".join(_help(capsys, "pretrain").split())
    assert "configs/vision_pretrain_mnist.yaml" in text
    assert "quickstart" not in text.split("examples:")[0].split("--set")[0].replace(
        "(quickstart, glue/sst2", ""
    )
    assert load_pretrain_config("vision_pretrain_mnist") == load_pretrain_config(None)


@pytest.mark.parametrize("command", sorted(cli.EXAMPLES))
def test_subcommand_help_has_a_description_and_examples(command, capsys):
    text = _help(capsys, command)
    usage, description = text.split("\n\n")[:2]
    assert description.strip().endswith(".") and len(description.split()) >= 4
    assert "examples:" in text and f"ffa-jax {command}" in text.split("examples:")[1]


def test_help_states_defaults(capsys):
    text = " ".join(_help(capsys, "bench").split())
    assert "examples per client step (default: 32)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_shipped_configs_load_by_name_from_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the shipped ones are found by name
    assert {"quickstart", "glue/sst2", "vision_pretrain_mnist"} <= set(shipped_configs())
    assert load_config("glue/sst2") == load_config(ROOT / "configs" / "glue" / "sst2.yaml")
    assert load_config("quickstart.yaml") == load_config("configs/quickstart.yaml")
    assert cli.main(["config", "--config", "glue/sst2", "--json"]) == 0
    assert _one_json_line(capsys.readouterr().out)["data"]["task"] == "sst2"
    assert cli.main(["config", "--config", "no_such_config"]) == 2
    assert "glue/sst2" in capsys.readouterr().err


def test_the_wheel_ships_the_configs():
    """Building a wheel is too slow for a test: the package-data globs of pyproject.toml must
    match every config under the package's configs/ link (which points at configs/)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = data["package-data"]["ffa_jax"]
    pkg = ROOT / "ffa_jax"
    assert (pkg / "configs").resolve() == (ROOT / "configs").resolve()
    assert SHIPPED_CONFIGS.resolve() == (ROOT / "configs").resolve()
    shipped = {p.relative_to(pkg).as_posix() for g in globs for p in pkg.glob(g)}
    every = {
        f"configs/{p.relative_to(ROOT / 'configs').as_posix()}"
        for p in (ROOT / "configs").rglob("*.yaml")
    }
    assert shipped == every


def test_experiment_runs_several_grids_one_after_the_other(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    argv = ["experiment", "rank_sweep", "alpha_sweep", "--quick", "--dry-run", "--json"]
    assert cli.main(argv) == 0
    out = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    assert [Path(r["out"]).name for r in out] == ["rank_sweep-quick", "alpha_sweep-quick"]
    # One --out cannot hold two grids: refused before anything runs, naming the flag.
    argv = ["experiment", "rank_sweep", "alpha_sweep", "--dry-run", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "--out=" in capsys.readouterr().err
