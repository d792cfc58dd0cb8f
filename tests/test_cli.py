"""The CLI's front door: ``--json`` (one JSON line on stdout, logs on stderr), the help texts,
``config --schema`` and the shipped configs. No training: the run functions are replaced."""

from __future__ import annotations

import json

import pytest

import ffa_jax.run
from ffa_jax import cli, xla_options
from ffa_jax.config import load_config


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
    assert train["lora.mode"]["choices"] == ["ffa", "lora"]
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
