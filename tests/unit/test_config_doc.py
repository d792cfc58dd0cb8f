"""docs/configuration.md is generated from the config dataclasses and must not go stale."""

import dataclasses
import typing
from pathlib import Path

from ffa_jax import config as config_lib
from ffa_jax import config_doc
from ffa_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_up_to_date():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == config_doc.render(), (
        "docs/configuration.md is stale: run `python -m ffa_jax.config_doc > docs/configuration.md`"
    )


def test_every_run_config_field_is_listed_with_a_meaning():
    text = config_doc.render()
    hints = typing.get_type_hints(config_lib.RunConfig)
    for section in dataclasses.fields(config_lib.RunConfig):
        cls = hints[section.name]
        if not dataclasses.is_dataclass(cls):
            assert f"| `{section.name}` |" in text
            continue
        for f in dataclasses.fields(cls):
            row = next(
                line for line in text.splitlines() if f"| `{section.name}.{f.name}` |" in line
            )
            assert not row.endswith("|  |"), f"{section.name}.{f.name} has no description"


def test_attribute_docs_parses_multi_name_entries():
    docs = config_doc.attribute_docs(config_lib.ViTArchConfig)
    assert docs["num_heads"] == docs["hidden_size"] and "width" in docs["hidden_size"]


def test_every_closed_set_of_values_is_in_choices():
    """A str field whose validator answers "one of (...)" is listed in config.CHOICES (so the
    schema and the reference show its choices), and every listed default is a choice."""
    cfg = config_lib.load_config(None)
    hints = typing.get_type_hints(config_lib.RunConfig)
    for section in dataclasses.fields(config_lib.RunConfig):
        cls = hints[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            if typing.get_type_hints(cls)[f.name] is not str:
                continue
            try:
                config_lib.replace(cfg, [f"{key}=not-a-choice"])
                closed = False
            except ConfigError as e:
                closed = "one of (" in str(e)
            assert closed == (key in config_lib.CHOICES), key
            if closed:
                assert getattr(getattr(cfg, section.name), f.name) in config_lib.CHOICES[key]
