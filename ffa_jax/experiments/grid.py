"""Experiment grids: a YAML file that expands into runs (cells).

A grid file (``experiments/grids/NAME.yaml``) holds::

    description: what the experiment shows
    kind: train                 # train | noise_amplification | theorem1 (what one cell runs)
    base: configs/quickstart.yaml
    set: [model.max_length=32, ...]       # overrides of every cell
    seeds: [0, 1, 2]
    axes:                                 # cartesian product, in this order
      lora.mode: [ffa, lora]
      privacy.epsilon: [inf, 6, 3, 1]
      partition:                          # a variant axis: named bundles of overrides
        iid: [data.partition=iid]
        dirichlet_0.1: [data.partition=dirichlet, data.dirichlet_alpha=0.1]
    per:                                  # overrides tied to axis values
      lora.mode: {ffa: [client.learning_rate=100], lora: [client.learning_rate=10]}
      lora.mode+privacy.epsilon: {ffa+inf: [client.learning_rate=20]}   # several axes
    select_on: validation                 # the only accepted value: selection never reads test
    tune:                                 # optional: pick fields' values per group of cells
      key: lora.mode                      # candidates depend on this axis' value (or
      grid:                               # axes joined by '+': ffa+inf); cartesian product
        client.learning_rate: {ffa: [1, 10, 100, 1000], lora: [0.1, 1, 10, 100]}
        lora.alpha: {ffa: [8], lora: [2, 8, 32]}
      extend: [client.learning_rate]      # a choice at the edge of its grid adds the next
      max_extend: 2                       # log step beyond it (at most this many per side)
      seeds: [1000]                       # tuning seeds, disjoint from the reported seeds
      shared_over: [data.partition]       # tuned at the first value of these axes only
      same_as: {privacy.epsilon: {3: 6, 1: 6}}   # these values reuse another value's choice
      # (one field: ``field: client.learning_rate`` + ``candidates: {ffa: [...], ...}``)
    claims:                               # optional: the verdicts table.md states
      - name: FFA-LoRA beats LoRA under DP
        axis: lora.mode                   # the paired comparison: better vs worse, per seed
        better: ffa
        worse: lora
        at: {privacy.epsilon: [8, 4, 2, 1]}   # one verdict per value (default: every group)
        metric: balanced_accuracy         # a selected-round test metric (default)
      - name: the lead grows as epsilon falls
        kind: gap_grows                   # per seed: (better - worse at `to`) minus (at `from`)
        axis: lora.mode
        better: ffa
        worse: lora
        along: {privacy.epsilon: [8, 1]}  # [from, to]
      - name: LoRA depends on alpha
        kind: depends                     # or insensitive: |difference| < margin
        axis: lora.alpha
        between: [1, 64]                  # per seed: alpha 1 minus alpha 64, two-sided
        at: {lora.mode: [lora]}
        margin: 0.02                      # the equivalence margin (metric units)
    pretrain: configs/vision_pretrain_mnist.yaml   # optional: the backbone the cells fine-tune
                                          # (model.name), trained once before the first cell
                                          # if its folder does not exist
    quick:                                # --quick: replaces set+=, seeds, axes, candidates,
                                          # grid, extend, max_extend, same_as, claims
      set: [...]
      seeds: [0]
      axes: {privacy.epsilon: [inf, 6]}
      candidates: {ffa: [50], lora: [5]}

Selection (the tuned values, and each run's reported round) reads only the validation split
(``data.validation_fraction`` > 0 in every cell, ``eval.select_metric``): a tuning cell's score
is its best validation metric over rounds, a candidate's score the mean over the tuning seeds
(a diverged run scores 0), and the reported cells' test metrics are those of their
validation-selected round (next to the last round's). A grid with ``select_on: test`` is
refused.

A cell is one run: its stage (``tune`` or ``main``), its axis values, its seed and the full list
of ``section.field=value`` overrides applied on top of ``base`` (so the cell can be rerun alone
with ``ffa-jax train --config BASE --set ...``). Cells are identified by a readable id built
from the stage, the axis values, the tuned value and the seed; the id is what makes resuming
work (a cell whose result file exists is not run again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ffa_jax.config import load_config, load_pretrain_config, parse_override
from ffa_jax.errors import ConfigError
from ffa_jax.experiments import stats

KINDS = ("train", "noise_amplification", "theorem1")
GRID_KEYS = (
    "description",
    "kind",
    "base",
    "set",
    "seeds",
    "axes",
    "per",
    "tune",
    "quick",
    "probe",
    "select_on",
    "claims",
    "pretrain",
)
QUICK_KEYS = (
    "set",
    "seeds",
    "axes",
    "candidates",
    "grid",
    "extend",
    "max_extend",
    "same_as",
    "probe",
    "claims",
)
TUNE_KEYS = (
    "field",
    "key",
    "candidates",
    "grid",
    "extend",
    "max_extend",
    "seeds",
    "shared_over",
    "same_as",
)
CLAIM_KEYS = (
    "name",
    "kind",
    "axis",
    "better",
    "worse",
    "along",
    "between",
    "margin",
    "at",
    "metric",
)
# What a claim states (the statistic and verdict rule: :mod:`ffa_jax.experiments.stats`):
# ``beats``: better > worse; ``gap_grows``: the gap better - worse is larger at ``along``'s
# second value than at its first; ``depends``: the metric differs between the two ``between``
# values of ``axis``; ``insensitive``: it differs by less than ``margin`` between them.
CLAIM_KINDS = tuple(stats.CLAIM_RULES)
# What selection may read. Anything else (``test``) is refused: see the module docstring.
SELECT_ON = ("validation",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tune:
    """Per-group selection of fields (learning rate, alpha, ...) on separate tuning seeds."""

    key: str | None
    # field -> {key-axis value (as str) -> candidate values}; the candidates of a group are the
    # cartesian product over fields, in this order.
    fields: Mapping[str, Mapping[str, tuple[Any, ...]]]
    seeds: tuple[int, ...]
    same_as: Mapping[str, Mapping[str, Any]]  # axis -> {value (str): representative value}
    extend: tuple[str, ...] = ()  # fields whose grid grows by a log step at a chosen edge
    max_extend: int = 0  # at most this many steps per side

    @property
    def field(self) -> str:
        """The first tuned field (the learning rate): plots' x axis."""
        return next(iter(self.fields))

    def representative(self, axes: Mapping[str, Any]) -> dict[str, Any]:
        """The point whose tuned value ``axes`` reuses."""
        out = dict(axes)
        for k, table in self.same_as.items():
            out[k] = table.get(fmt_value(axes[k]), axes[k])
        return out

    def key_of(self, axes: Mapping[str, Any]) -> str:
        if self.key is None:
            return "*"
        rep = self.representative(axes)
        return "+".join(fmt_value(rep[k]) for k in self.key.split("+"))

    def field_candidates(self, axes: Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
        """``{field: base candidate values}`` of the group of ``axes``."""
        k = self.key_of(axes)
        return {f: table[k] for f, table in self.fields.items()}

    def candidates_for(self, axes: Mapping[str, Any]) -> tuple[Any, ...]:
        """The first field's candidates (one-field grids)."""
        return self.field_candidates(axes)[self.field]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grid:
    """A parsed, validated grid (after ``--quick`` and ``--seeds`` were applied)."""

    name: str
    path: Path
    description: str
    kind: str
    base: Path | None
    set: tuple[str, ...]
    seeds: tuple[int, ...]
    axes: dict[str, tuple[Any, ...]]  # ordered
    per: dict[str, dict[str, tuple[str, ...]]]
    variants: dict[str, dict[str, tuple[str, ...]]]  # variant axis -> {label: overrides}
    tune: Tune | None
    probe: dict[str, Any]  # kind-specific settings (noise_amplification, theorem1)
    quick: bool
    select_on: str = "validation"
    # Every cell holds out a validation split: runs.csv / table.md in the evidence format
    # (:mod:`ffa_jax.experiments.evidence`).
    evidence: bool = False
    claims: tuple[dict[str, Any], ...] = ()
    # A ``ffa-jax pretrain`` config whose model folder the cells fine-tune (``model.name``):
    # the runner trains it once, before the first cell, when the folder does not exist.
    pretrain: Path | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cell:
    """One run of a grid."""

    stage: str  # "tune" or "main"
    axes: dict[str, Any]  # axis field -> value (ordered as in the grid)
    seed: int
    # ((field, value), ...) chosen or tried for this cell, in the tune grid's field order
    tuned: tuple[tuple[str, Any], ...] | None
    overrides: tuple[str, ...]  # everything on top of the base config, seed last

    @property
    def cell_id(self) -> str:
        parts = [self.stage]
        parts += [f"{short(k)}={fmt_value(v)}" for k, v in self.axes.items()]
        for field, value in self.tuned or ():
            parts.append(f"{short(field)}={fmt_value(value)}")
        parts.append(f"seed={self.seed}")
        return ",".join(parts)

    @property
    def file_stem(self) -> str:
        """A file-system-safe name for the cell: its readable id plus a hash of the id and of
        every override, so that editing a grid's settings makes new cells (never reuses the
        results of the old settings)."""
        text = "\n".join([self.cell_id, *self.overrides])
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        safe = re.sub(r"[^A-Za-z0-9_.\-]+", "_", self.cell_id.replace("=", "-"))[:120]
        return f"{safe}-{digest}"

    @property
    def group(self) -> tuple[tuple[str, str], ...]:
        """The axis values without the seed: cells of one group are averaged over seeds."""
        return tuple((k, fmt_value(v)) for k, v in self.axes.items())


def short(field: str) -> str:
    """``privacy.epsilon`` -> ``epsilon``: the column name of an axis."""
    return field.rsplit(".", 1)[-1]


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:g}"
    return str(v)


def tuned_values(c: dict[str, Any]) -> dict[str, Any]:
    """``{field: value}`` a cell record was run with (records of older code hold one
    ``[field, value]`` pair, newer ones a list of pairs)."""
    t = c.get("tuned")
    if not t:
        return {}
    if isinstance(t[0], str):
        return {t[0]: t[1]}
    return {f: v for f, v in t}


def tuned_label(c: dict[str, Any]) -> str:
    """``"1, 8"``: the tuned values of a cell record, in the grid's field order."""
    return ", ".join(fmt_value(v) for v in tuned_values(c).values())


# Display names of the ``lora.mode`` axis values (tables and plot legends).
METHOD = {
    "ffa": "FFA-LoRA",
    "lora": "LoRA",
    "fedsa": "FedSA-LoRA",
    "rolora": "RoLoRA",
    "fedsb": "Fed-SB",
    "fedex": "FedEx-LoRA",
    "fedsvd": "FedSVD",
    "flora": "FLoRA",
}


def axis_label(field: str, value: str) -> str:
    """How a table shows an axis value: the method's name for ``lora.mode`` (``FFA-LoRA``),
    else the value itself."""
    return METHOD.get(value, value) if field == "lora.mode" else value


def axis_order(grid, axes: dict[str, str]) -> tuple[int, ...]:
    """Sort key of a cell's ``axes``: the position of each axis value in the grid file."""
    order = []
    for a, values in grid.axes.items():
        names = [fmt_value(v) for v in values]
        order.append(names.index(axes[a]) if axes.get(a) in names else len(names))
    return tuple(order)


def as_value(v: Any) -> Any:
    """An axis value as compared in a grid: ``"inf"`` (how YAML reads it) as ``math.inf``."""
    # Overrides parse the string back; here it must compare as a float.
    if isinstance(v, str) and v.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    return v


def override(field: str, value: Any) -> str:
    return f"{field}={fmt_value(value) if not isinstance(value, (list, tuple)) else value}"


def _need(cond: bool, where: str, fix: str) -> None:
    if not cond:
        raise ConfigError(f"{where} is invalid: {fix}")


def _str_list(x: Any, where: str) -> tuple[str, ...]:
    if x is None:
        return ()
    _need(
        isinstance(x, list) and all(isinstance(s, str) and "=" in s for s in x),
        where,
        "give a list of section.field=value strings.",
    )
    for s in x:
        parse_override(s)
    return tuple(x)


def _axes(x: Any, where: str, variants: dict | None = None) -> dict[str, tuple[Any, ...]]:
    """Axes ``section.field: [values]``, or variant axes ``name: {label: [overrides]}`` (their
    bundles go into ``variants``)."""
    if x is None:
        return {}
    _need(isinstance(x, dict), where, "give a mapping of section.field: [values].")
    out = {}
    for k, v in x.items():
        if isinstance(v, dict) and variants is not None and v:
            variants[k] = {
                str(label): _str_list(o, f"{where}.{k}.{label}") for label, o in v.items()
            }
            out[k] = tuple(str(label) for label in v)
            continue
        _need(
            isinstance(k, str) and isinstance(v, list) and len(v) > 0,
            f"{where}.{k}",
            "each axis is section.field: [one or more values], or name: {label: [overrides]}.",
        )
        out[k] = tuple(as_value(e) for e in v)
    return out


def _seeds(x: Any, where: str) -> tuple[int, ...]:
    _need(
        isinstance(x, list) and x and all(isinstance(s, int) and s >= 0 for s in x),
        where,
        "give a non-empty list of integer seeds >= 0, e.g. [0, 1, 2].",
    )
    return tuple(x)


def find_grid(name: str, grids_dir: Path = Path("experiments/grids")) -> Path:
    """``NAME`` -> ``experiments/grids/NAME.yaml`` (or ``NAME`` itself if it is a file)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    cand = grids_dir / f"{name}.yaml"
    if cand.is_file():
        return cand
    have = sorted(q.stem for q in grids_dir.glob("*.yaml")) if grids_dir.is_dir() else []
    raise ConfigError(
        f"experiment {name!r}: no grid file {str(cand)!r}. Known grids: {have or 'none'} "
        "(run from the repository root, or pass the path of a grid YAML file)."
    )


def load_grid(path: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None) -> Grid:
    """Reads and validates a grid file; ``quick`` applies its ``quick:`` section.

    Raises:
      ConfigError: unknown keys, malformed axes or overrides, or a base config / cell config
        that does not validate (every cell's config is built here, before anything runs).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"grid file {str(path)!r} is not valid YAML: {e}") from e
    _need(isinstance(raw, dict), f"grid file {str(path)!r}", "must hold a mapping.")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    _need(not unknown, f"grid file {str(path)!r}", f"unknown keys {unknown}; valid: {GRID_KEYS}.")
    kind = raw.get("kind", "train")
    _need(kind in KINDS, f"{path.name}: kind={kind!r}", f"use one of {KINDS}.")
    base = raw.get("base")
    base_path = Path(base) if base else None
    if base_path is not None and not base_path.is_file():
        raise ConfigError(
            f"{path.name}: base={base!r} does not exist (paths are relative to the repository "
            "root; run ffa-jax experiment from there)."
        )
    sets = _str_list(raw.get("set"), f"{path.name}: set")
    grid_seeds = _seeds(raw.get("seeds", [0]), f"{path.name}: seeds")
    variants: dict[str, dict[str, tuple[str, ...]]] = {}
    axes = _axes(raw.get("axes"), f"{path.name}: axes", variants)
    probe = dict(raw.get("probe") or {})
    per_raw = raw.get("per") or {}
    _need(isinstance(per_raw, dict), f"{path.name}: per", "give axis: {value: [overrides]}.")
    per = {}
    for ax, table in per_raw.items():
        _need(
            all(a in axes for a in ax.split("+")),
            f"{path.name}: per.{ax}",
            f"must name an axis of {list(axes)} (or several joined by '+').",
        )
        _need(isinstance(table, dict), f"{path.name}: per.{ax}", "give {value: [overrides]}.")
        per[ax] = {
            "+".join(fmt_value(as_value(p)) for p in str(v).split("+")): _str_list(
                o, f"{path.name}: per.{ax}.{v}"
            )
            for v, o in table.items()
        }
    tune_raw = raw.get("tune")
    quick_raw = raw.get("quick") or {}
    _need(isinstance(quick_raw, dict), f"{path.name}: quick", "must be a mapping.")
    bad = sorted(set(quick_raw) - set(QUICK_KEYS))
    _need(not bad, f"{path.name}: quick", f"unknown keys {bad}; valid: {QUICK_KEYS}.")
    if quick:
        sets = sets + _str_list(quick_raw.get("set"), f"{path.name}: quick.set")
        if "seeds" in quick_raw:
            grid_seeds = _seeds(quick_raw["seeds"], f"{path.name}: quick.seeds")
        for k, v in _axes(quick_raw.get("axes"), f"{path.name}: quick.axes").items():
            _need(k in axes, f"{path.name}: quick.axes.{k}", f"must name an axis of {list(axes)}.")
            if k in variants:
                unknown_labels = [e for e in v if str(e) not in variants[k]]
                _need(
                    not unknown_labels, f"{path.name}: quick.axes.{k}", f"unknown {unknown_labels}."
                )
                v = tuple(str(e) for e in v)
            axes[k] = v
        probe.update(quick_raw.get("probe") or {})
    if seeds:
        grid_seeds = _seeds(list(seeds), "--seeds")
    select_on = str(raw.get("select_on", "validation"))
    _need(
        select_on in SELECT_ON,
        f"{path.name}: select_on={select_on!r}",
        "selection (learning rate, clip norm, alpha, the reported round) reads only the "
        "validation split; use select_on: validation with data.validation_fraction > 0 (the "
        "test split is read once per final configuration).",
    )
    tune = None
    if tune_raw is not None:
        tune = _tune(tune_raw, quick_raw if quick else {}, axes, path.name)
    # --quick may state its own claims (its axes may lack the full grid's values).
    claims_raw = quick_raw["claims"] if quick and "claims" in quick_raw else raw.get("claims")
    claims = _claims(claims_raw, axes, path.name)
    grid = Grid(
        name=path.stem,
        path=path,
        description=str(raw.get("description", "")).strip(),
        kind=kind,
        base=base_path,
        set=sets,
        seeds=grid_seeds,
        axes=axes,
        per=per,
        variants=variants,
        tune=tune,
        probe=probe,
        quick=quick,
        select_on=select_on,
        claims=claims,
    )
    # Every cell's config must validate before anything runs (built once, checked below).
    configs = [cell_config(grid, c, ()) for c in tune_cells(grid) + main_cells(grid, chosen=None)]
    fractions = [c.data.validation_fraction for c in configs]
    if tune is not None and not all(fractions):
        raise ConfigError(
            f"{path.name}: tune selects on the validation split, but some cells have "
            "data.validation_fraction=0; add data.validation_fraction=0.1 to the grid's set:."
        )
    if claims and not all(fractions):
        raise ConfigError(
            f"{path.name}: claims compare validation-selected rounds; add "
            "data.validation_fraction=0.1 to the grid's set:."
        )
    pretrain = _pretrain(
        raw.get("pretrain"), grid, path.name, {Path(c.model.name) for c in configs}
    )
    return dataclasses.replace(grid, evidence=kind == "train" and all(fractions), pretrain=pretrain)


def pretrain_folder(config: Path) -> Path:
    """The model folder that ``ffa-jax pretrain --config config`` writes."""
    pcfg = load_pretrain_config(config)
    return Path(pcfg.output_dir) / pcfg.name


def _pretrain(raw: Any, grid: Grid, name: str, names: set[Path]) -> Path | None:
    """The grid's ``pretrain:`` config, checked against ``names``, the model folders its
    cells fine-tune."""
    if raw is None:
        return None
    _need(isinstance(raw, str), f"{name}: pretrain", "give the path of a pretrain config.")
    config = Path(raw)
    _need(
        config.is_file(),
        f"{name}: pretrain={raw!r}",
        "does not exist (paths are relative to the repository root).",
    )
    _need(grid.kind == "train", f"{name}: pretrain", "only train grids fine-tune a backbone.")
    folder = pretrain_folder(config)
    _need(
        names == {folder},
        f"{name}: pretrain={raw!r}",
        f"writes {str(folder)!r}, but the cells fine-tune {sorted(map(str, names))}; set "
        f"model.name={folder} in the grid's set: (or the pretrain config's name).",
    )
    return config


def _tune(raw: Any, quick_raw: Mapping, axes, name: str) -> Tune:
    _need(isinstance(raw, dict), f"{name}: tune", "must be a mapping.")
    bad = sorted(set(raw) - set(TUNE_KEYS))
    _need(not bad, f"{name}: tune", f"unknown keys {bad}; valid: {TUNE_KEYS}.")
    key = raw.get("key")
    _need(
        key is None or all(k in axes for k in str(key).split("+")),
        f"{name}: tune.key",
        f"must be an axis of {list(axes)}, or several joined by '+'.",
    )
    if "grid" in raw:
        _need(
            "field" not in raw and "candidates" not in raw,
            f"{name}: tune",
            "give either grid: {field: {key value: [values]}} or field + candidates, not both.",
        )
        fields_raw = raw["grid"]
        if "grid" in quick_raw:
            fields_raw = quick_raw["grid"]
        _need(isinstance(fields_raw, dict) and fields_raw, f"{name}: tune.grid", "give a mapping.")
    else:
        cands = raw.get("candidates")
        if "candidates" in quick_raw:
            cands = quick_raw["candidates"]
        fields_raw = {str(raw.get("field", "client.learning_rate")): cands}
    fields: dict[str, dict[str, tuple[Any, ...]]] = {}
    for field, cands in fields_raw.items():
        parse_override(f"{field}=0")
        if key is None and isinstance(cands, list):
            cands = {"*": cands}
        _need(
            isinstance(cands, dict) and all(isinstance(v, list) and v for v in cands.values()),
            f"{name}: tune candidates of {field}",
            "give {key-axis value: [candidate values]} (or a list without tune.key).",
        )
        fields[str(field)] = {
            "+".join(fmt_value(as_value(p)) for p in str(k).split("+")): tuple(v)
            for k, v in cands.items()
        }
    extend = tuple(quick_raw.get("extend", raw.get("extend")) or ())
    _need(
        all(f in fields for f in extend),
        f"{name}: tune.extend",
        f"must name tuned fields of {list(fields)}.",
    )
    for f in extend:
        _need(
            all(isinstance(v, (int, float)) and v > 0 for t in fields[f].values() for v in t),
            f"{name}: tune.extend.{f}",
            "an extended field needs positive numeric candidates (a log-spaced grid).",
        )
    max_extend = quick_raw.get("max_extend", raw.get("max_extend", 2 if extend else 0))
    _need(
        isinstance(max_extend, int) and max_extend >= 0,
        f"{name}: tune.max_extend={max_extend!r}",
        "give an integer >= 0.",
    )
    shared = tuple(raw.get("shared_over") or ())
    _need(
        all(s in axes for s in shared),
        f"{name}: tune.shared_over",
        f"must name axes of {list(axes)}.",
    )
    same_raw = quick_raw.get("same_as", raw.get("same_as")) or {}
    _need(isinstance(same_raw, dict), f"{name}: tune.same_as", "give {axis: {v: w}}.")
    same: dict[str, dict[str, Any]] = {}
    for ax in shared:
        same[ax] = {fmt_value(v): axes[ax][0] for v in axes[ax]}
    for ax, table in same_raw.items():
        _need(
            ax in axes and isinstance(table, dict),
            f"{name}: tune.same_as.{ax}",
            f"must map values of an axis of {list(axes)} to other values of it.",
        )
        known = {fmt_value(v): v for v in axes[ax]}
        for v, w in table.items():
            w = as_value(w)
            if fmt_value(as_value(v)) in known and fmt_value(w) not in known:
                raise ConfigError(
                    f"{name}: tune.same_as.{ax}.{v}={w!r} is not a value of axis {ax} "
                    f"({list(known)})."
                )
            same.setdefault(ax, {})[fmt_value(as_value(v))] = w
    tune = Tune(
        key=key,
        fields=fields,
        seeds=_seeds(raw.get("seeds", [1000]), f"{name}: tune.seeds"),
        same_as=same,
        extend=extend,
        max_extend=max_extend,
    )
    for point in _axis_points_of(axes):
        try:
            tune.field_candidates(point)
        except KeyError as e:
            raise ConfigError(
                f"{name}: the tune candidates have no entry {e.args[0]!r} (tune.key={key})."
            ) from None
    return tune


def _claims(raw: Any, axes, name: str) -> tuple[dict[str, Any], ...]:
    """The normalised claims: ``name``, ``kind``, ``axis``, the two compared values of
    ``axis`` as ``better`` / ``worse`` (``between``'s two values for ``depends`` and
    ``insensitive``), ``along`` (``gap_grows``: ``(axis, from, to)``, else None), ``at``,
    ``metric`` and ``margin`` (``depends`` / ``insensitive``, else 0)."""
    if raw is None:
        return ()
    _need(isinstance(raw, list), f"{name}: claims", "give a list of claims.")
    out = []
    for i, c in enumerate(raw):
        where = f"{name}: claims[{i}]"
        _need(isinstance(c, dict), where, "each claim is a mapping.")
        bad = sorted(set(c) - set(CLAIM_KEYS))
        _need(not bad, where, f"unknown keys {bad}; valid: {CLAIM_KEYS}.")
        kind = str(c.get("kind", "beats"))
        _need(kind in CLAIM_KINDS, f"{where}.kind={kind!r}", f"use one of {CLAIM_KINDS}.")
        ax = c.get("axis")
        _need(ax in axes, f"{where}.axis={ax!r}", f"must be an axis of {list(axes)}.")
        values = [fmt_value(v) for v in axes[ax]]
        two_values = kind in stats.EQUIVALENCE_KINDS
        if two_values:
            # One axis at two values (a method's sensitivity to alpha, say): ``between``.
            _need(
                "better" not in c and "worse" not in c,
                where,
                f"kind {kind} compares the two values of `between`; drop better/worse.",
            )
            pair = c.get("between")
            _need(
                isinstance(pair, list)
                and len(pair) == 2
                and all(fmt_value(as_value(v)) in values for v in pair)
                and fmt_value(as_value(pair[0])) != fmt_value(as_value(pair[1])),
                f"{where}.between={pair!r}",
                f"give two different values of axis {ax}: {values}.",
            )
            sides = [fmt_value(as_value(v)) for v in pair]
        else:
            _need("between" not in c, f"{where}.between", "only for depends / insensitive.")
            for side in ("better", "worse"):
                _need(
                    fmt_value(as_value(c.get(side))) in values,
                    f"{where}.{side}={c.get(side)!r}",
                    f"must be a value of axis {ax}: {values}.",
                )
            sides = [fmt_value(as_value(c[s])) for s in ("better", "worse")]
        along = None
        if kind == "gap_grows":
            a = c.get("along")
            ok = isinstance(a, dict) and len(a) == 1
            other, pair = next(iter(a.items())) if ok else (None, None)
            ok = ok and other in axes and other != ax and isinstance(pair, list) and len(pair) == 2
            other_values = [fmt_value(v) for v in axes[other]] if ok else []
            pts = [fmt_value(as_value(v)) for v in pair] if ok else []
            _need(
                ok and all(v in other_values for v in pts) and pts[0] != pts[1],
                f"{where}.along={a!r}",
                f"give {{axis: [from, to]}}: another axis of {list(axes)} and two of its values "
                "(the claim: the gap is larger at `to`).",
            )
            along = (other, pts[0], pts[1])
        else:
            _need("along" not in c, f"{where}.along", "only for kind gap_grows.")
        at = c.get("at") or {}
        _need(
            isinstance(at, dict)
            and all(a in axes and a != ax and (along is None or a != along[0]) for a in at),
            f"{where}.at",
            f"give {{axis: [values]}} over the other axes of {list(axes)}.",
        )
        metric = str(c.get("metric", "balanced_accuracy"))
        _need(
            metric in ("balanced_accuracy", "accuracy", "macro_f1", "auc"),
            f"{where}.metric={metric!r}",
            "use balanced_accuracy, accuracy, macro_f1 or auc.",
        )
        margin = c.get("margin", 0.0)
        if two_values:
            # An equivalence margin decides "no effect": it must be stated up front.
            _need(
                isinstance(margin, (int, float)) and 0 < margin < 1 and "margin" in c,
                f"{where}.margin={c.get('margin')!r}",
                "give the equivalence margin in metric units, e.g. 0.02 (a difference whose "
                "95% interval lies within +-margin counts as no effect).",
            )
        else:
            _need("margin" not in c, f"{where}.margin", "only for depends / insensitive.")
        out.append(
            {
                "name": str(c.get("name") or f"claim {i + 1}"),
                "kind": kind,
                "axis": ax,
                "better": sides[0],
                "worse": sides[1],
                "along": along,
                "at": {a: [fmt_value(as_value(v)) for v in vs] for a, vs in at.items()},
                "metric": metric,
                "margin": float(margin),
            }
        )
    return tuple(out)


def _axis_points_of(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*axes.values())]


def _axis_points(grid: Grid) -> list[dict[str, Any]]:
    return _axis_points_of(grid.axes)


def _overrides(grid: Grid, axes: Mapping[str, Any], tuned, seed: int) -> tuple[str, ...]:
    out = list(grid.set)
    for k, v in axes.items():
        if k in grid.variants:
            out += grid.variants[k][fmt_value(v)]
        else:
            out.append(override(k, v))
    for k, table in grid.per.items():
        value = "+".join(fmt_value(axes[a]) for a in k.split("+"))
        out += table.get(value, ())
    for field, value in tuned or ():
        out.append(override(field, value))
    out.append(f"seed={seed}")
    # Research grids are reproducible by design: the noise is regenerable from the cell's seed
    # (the runs say so); none of them is a private release.
    out.append(f"privacy.noise_seed={seed}")
    return tuple(out)


def tune_group(grid: Grid, axes: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The tuning group of a point: the axis values of the point it reuses the choice of."""
    assert grid.tune is not None
    return tuple((k, fmt_value(v)) for k, v in grid.tune.representative(axes).items())


def log_extension(base: Sequence[Any], side: str, steps: int) -> float:
    """The candidate ``steps`` log steps beyond the ``low``/``high`` edge of ``base`` (the step
    is the ratio of the two values nearest that edge; 10 for a one-value grid), rounded to 6
    significant digits."""
    b = sorted(float(v) for v in base)
    if side == "low":
        ratio = b[1] / b[0] if len(b) > 1 else 10.0
        v = b[0] / ratio**steps
    else:
        ratio = b[-1] / b[-2] if len(b) > 1 else 10.0
        v = b[-1] * ratio**steps
    return float(f"{v:.6g}")


def group_candidates(
    grid: Grid, point: Mapping[str, Any], extensions: Mapping[tuple, Mapping[str, Any]] | None
) -> dict[str, tuple[Any, ...]]:
    """``{field: candidates}`` of the tuning group of ``point``: the grid's, plus the log
    steps ``extensions[group][field] = {"low": n, "high": m}`` beyond its edges (sorted)."""
    assert grid.tune is not None
    cands = dict(grid.tune.field_candidates(point))
    ext = (extensions or {}).get(tune_group(grid, point), {})
    for field, sides in ext.items():
        base = cands[field]
        extra = [log_extension(base, side, j) for side, n in sides.items() for j in range(1, n + 1)]
        cands[field] = tuple(sorted({*map(as_value, base), *extra}, key=float))
    return cands


def tune_cells(
    grid: Grid, extensions: Mapping[tuple, Mapping[str, Any]] | None = None
) -> list[Cell]:
    """Every (representative point, candidate combination, tuning seed) cell; ``extensions``:
    the log steps added beyond a grid's edges (see :func:`group_candidates`)."""
    if grid.tune is None:
        return []
    # A tuning run reads the validation split only: the test split is read once per final
    # configuration (the reported cells), never for a candidate.
    no_test = ("eval.test=false",) if grid.kind == "train" else ()
    cells, seen = [], set()
    for point in _axis_points(grid):
        point = grid.tune.representative(point)
        g = tune_group(grid, point)
        if g in seen:
            continue
        seen.add(g)
        cands = group_candidates(grid, point, extensions)
        for combo in itertools.product(*cands.values()):
            tuned = tuple((f, as_value(v)) for f, v in zip(cands, combo, strict=True))
            for seed in grid.tune.seeds:
                cells.append(
                    Cell(
                        stage="tune",
                        axes=point,
                        seed=seed,
                        tuned=tuned,
                        overrides=_overrides(grid, point, tuned, seed) + no_test,
                    )
                )
    return cells


def main_cells(grid: Grid, chosen: Mapping[tuple, Any] | None) -> list[Cell]:
    """The reported cells. With tuning, ``chosen[tune_group]`` is the selected
    ``((field, value), ...)`` (None: the first candidates, used only to validate configs
    before tuning has run)."""
    cells = []
    for point in _axis_points(grid):
        tuned = None
        if grid.tune is not None:
            g = tune_group(grid, point)
            if chosen is not None:
                tuned = tuple(chosen[g])
            else:
                cands = grid.tune.field_candidates(point)
                tuned = tuple((f, as_value(v[0])) for f, v in cands.items())
        for seed in grid.seeds:
            cells.append(
                Cell(
                    stage="main",
                    axes=point,
                    seed=seed,
                    tuned=tuned,
                    overrides=_overrides(grid, point, tuned, seed),
                )
            )
    return cells


def cell_config(grid: Grid, cell: Cell, extra: Sequence[str]):
    """The validated :class:`ffa_jax.config.RunConfig` of a cell (``extra``: CLI ``--set``)."""
    try:
        return load_config(grid.base, [*cell.overrides, *extra])
    except ConfigError as e:
        raise ConfigError(f"grid {grid.name}, cell {cell.cell_id}: {e}") from e
