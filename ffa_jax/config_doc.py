"""The configuration reference (``docs/configuration.md``) and schema (``ffa-jax config
--schema``), generated from the config dataclasses of :mod:`ffa_jax.config`: every section,
field, type, choices (:data:`ffa_jax.config.CHOICES`) and default, and the field's description
from its class's ``Attributes:`` docstring.

``python -m ffa_jax.config_doc > docs/configuration.md`` regenerates it;
``tests/unit/test_config_doc.py`` checks that the committed file equals the output, so the reference
cannot go stale.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

from ffa_jax import config as config_lib

# The run's top-level fields are not a section: their meaning, stated once here.
TOP_LEVEL = {
    "name": "the run's name; its directory is ``output_dir/name``.",
    "seed": "the public root seed: the shared LoRA A, the head init, the data split and the "
    "partition (split by purpose with ``jax.random.fold_in``).",
    "output_dir": "where run directories are written.",
}

PRETRAIN_TOP_LEVEL = {**TOP_LEVEL, "name": "the run's name; its directory is ``output_dir/name``."}

# Fields whose class docstring has no ``Attributes:`` entry (yet): their meaning, from the
# hand-written table this reference replaced. A docstring entry takes precedence.
FALLBACK = {
    "DataConfig": {
        "label_mix": "with ``partition: label_mix``, row k is client k's label distribution; "
        "the default is the paper's binary mixes.",
        "dirichlet_alpha": "heterogeneity of ``dirichlet`` (smaller = more skewed).",
        "text_field": "text tasks: the text column of local files and HF datasets.",
        "label_field": "the label column of local files and HF datasets.",
    },
    "ServerConfig": {
        "optimizer": "``sgd`` (learning rate 1 = FedAvg), ``momentum`` (FedAvgM), ``adam`` "
        "(FedAdam) or ``yogi`` (FedYogi), applied to the averaged client update.",
        "learning_rate": "server learning rate.",
        "momentum": "momentum of ``momentum``.",
        "b1": "first-moment decay of ``adam``/``yogi``.",
        "b2": "second-moment decay of ``adam``/``yogi``.",
        "eps": "``adam``/``yogi``'s epsilon (tau in Reddi et al., 2021).",
    },
}

_ATTR = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*(?:, [A-Za-z_][A-Za-z0-9_]*)*):\s?(.*)$")


def attribute_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` parsed from the ``Attributes:`` section of ``cls``'s
    docstring (continuation lines joined with spaces)."""
    doc = inspect.getdoc(cls) or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    current = None
    indent = None
    for line in lines[start + 1 :]:
        if not line.strip():
            current = None
            continue
        m = _ATTR.match(line)
        if m and (indent is None or len(m.group(1)) == indent):
            indent = len(m.group(1))
            current = m.group(2)
            out[current] = m.group(3).strip()
        elif current is not None and indent is not None and len(line) - len(line.lstrip()) > indent:
            out[current] += " " + line.strip()
        else:
            break
    # "a, b: text" documents several fields at once.
    return {name: text for key, text in out.items() for name in key.split(", ")}


def _type_name(tp: Any) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return text or str(tp).replace("typing.", "")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if isinstance(value, float) and value == float("inf"):
        return "`inf`"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        value = _plain(value)
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _cell(text: str) -> str:
    # One table row: escape pipes, turn reST roles and ``literals`` into Markdown `literals`.
    text = re.sub(r":(?:mod|func|class|data|meth):`~?([^`]+)`", r"``\1``", text)
    return re.sub(r"``(.+?)``", r"`\1`", text).replace("|", "\\|")


def _choices_note(choices: tuple[str, ...] | None) -> str:
    return "" if not choices else " One of " + ", ".join(f"``{c}``" for c in choices) + "."


def section_table(
    cls: type,
    prefix: str,
    docs: dict[str, str] | None = None,
    choices: dict[str, tuple[str, ...]] | None = None,
) -> list[str]:
    if docs is None:
        docs = {**FALLBACK.get(cls.__name__, {}), **attribute_docs(cls)}
    choices = choices or {}
    hints = typing.get_type_hints(cls)
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        meaning = docs.get(f.name, "") + _choices_note(choices.get(prefix + f.name))
        rows.append(
            f"| `{prefix}{f.name}` | {_cell(_type_name(hints[f.name]))} | {_cell(_default(f))} "
            f"| {_cell(meaning.strip())} |"
        )
    return rows


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    para = doc.split("\n\n", 1)[0]
    return _cell(" ".join(para.split()))


def reference(
    root: type,
    title: str,
    command: str,
    top_docs: dict[str, str],
    choices: dict[str, tuple[str, ...]] | None = None,
) -> list[str]:
    hints = typing.get_type_hints(root)
    out = [f"## {title}", "", _summary(root), "", f"Used by `{command}`.", ""]
    out += ["### Top level", ""] + section_table(root, "", top_docs, choices) + [""]
    for f in dataclasses.fields(root):
        cls = hints[f.name]
        if not dataclasses.is_dataclass(cls):
            continue
        out += [f"### `{f.name}`", "", _summary(cls), ""]
        out += section_table(cls, f"{f.name}.", None, choices) + [""]
    return out


def _json_default(field: dataclasses.Field) -> Any:
    """The field's default as JSON: tuples as lists, infinity as the YAML string ``"inf"``;
    a required field has none (``MISSING``)."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return dataclasses.MISSING
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return _plain(value)


def _help_text(text: str) -> str:
    """A docstring entry as plain text (reST roles and ``literals`` unwrapped)."""
    text = re.sub(r":(?:mod|func|class|data|meth):`~?([^`]+)`", r"\1", text)
    return re.sub(r"``(.+?)``", r"\1", text)


def config_schema(
    root: type, top_docs: dict[str, str], choices: dict[str, tuple[str, ...]] | None = None
) -> dict[str, Any]:
    """The schema of one root config class: its summary and, per field as ``--set`` names it
    (``section.field``), ``type``, ``default`` (absent if required), ``choices`` (the closed
    set, if any) and ``help``. The same introspection as the Markdown reference."""
    choices = choices or {}
    fields: dict[str, Any] = {}

    def add(cls: type, prefix: str, docs: dict[str, str]) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                sub = hints[f.name]
                add(sub, f"{f.name}.", {**FALLBACK.get(sub.__name__, {}), **attribute_docs(sub)})
                continue
            entry: dict[str, Any] = {"type": _type_name(hints[f.name])}
            default = _json_default(f)
            if default is not dataclasses.MISSING:
                entry["default"] = default
            if prefix + f.name in choices:
                entry["choices"] = list(choices[prefix + f.name])
            entry["help"] = _help_text(" ".join(docs.get(f.name, "").split()))
            fields[prefix + f.name] = entry

    add(root, "", top_docs)
    summary = " ".join((inspect.getdoc(root) or "").split("\n\n", 1)[0].split())
    return {"description": _help_text(summary), "fields": fields}


def schema() -> dict[str, Any]:
    """``ffa-jax config --schema``: ``{"train": ..., "pretrain": ...}``, each from
    :func:`config_schema` (the run config of ``ffa-jax train``/``privacy``/``audit``/``flower``
    and the pretraining config of ``ffa-jax pretrain``)."""
    return {
        "train": config_schema(config_lib.RunConfig, TOP_LEVEL, config_lib.CHOICES),
        "pretrain": config_schema(config_lib.PretrainConfig, PRETRAIN_TOP_LEVEL),
    }


def render() -> str:
    """The whole ``docs/configuration.md``."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m ffa_jax.config_doc > docs/configuration.md` from the",
        "config dataclasses in ffa_jax/config.py; tests/unit/test_config_doc.py checks it. Do not",
        "edit by hand. -->",
        "",
        "A run is one YAML file (e.g. [`configs/quickstart.yaml`](../configs/quickstart.yaml))",
        "of the sections below; any field can be overridden on the command line with",
        "`--set section.field=value` (the value is YAML: `inf`, `1e-5`, `[[0.9, 0.1]]`) or in",
        "Python with `ffa_jax.finetune(config, section={field: value})`. Bad values fail before",
        "any compute with a message naming the field and the fix.",
        "",
    ]
    lines += reference(
        config_lib.RunConfig, "Run config", "ffa-jax train", TOP_LEVEL, config_lib.CHOICES
    )
    lines += reference(
        config_lib.PretrainConfig, "Pretraining config", "ffa-jax pretrain", PRETRAIN_TOP_LEVEL
    )
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
