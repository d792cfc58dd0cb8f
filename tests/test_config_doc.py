"""docs/configuration.md is generated from the config dataclasses and must not go stale."""

import dataclasses
import typing
from pathlib import Path

from ffa_jax import config as config_lib
from ffa_jax import config_doc

ROOT = Path(__file__).resolve().parents[1]


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
