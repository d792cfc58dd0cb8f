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
    tune:                                 # optional: pick one field's value per group of cells
      field: client.learning_rate
      key: lora.mode                      # candidates depend on this axis' value (or
      candidates: {ffa: [50, 100, 200], lora: [3, 10, 30]}   # axes joined by '+': ffa+inf)
      seeds: [1000]                       # tuning seeds, disjoint from the reported seeds
      shared_over: [data.partition]       # tuned at the first value of these axes only
      same_as: {privacy.epsilon: {3: 6, 1: 6}}   # these values reuse another value's choice
    quick:                                # --quick: replaces set+=, seeds, axes, candidates
      set: [...]
      seeds: [0]
      axes: {privacy.epsilon: [inf, 6]}
      candidates: {ffa: [50], lora: [5]}

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

from ffa_jax.config import load_config, parse_override
from ffa_jax.errors import ConfigError

KINDS = ("train", "noise_amplification", "theorem1")
GRID_KEYS = ("description", "kind", "base", "set", "seeds", "axes", "per", "tune", "quick", "probe")
QUICK_KEYS = ("set", "seeds", "axes", "candidates", "probe")
TUNE_KEYS = ("field", "key", "candidates", "seeds", "shared_over", "same_as")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tune:
    """Per-group selection of one field (the learning rate) on separate tuning seeds."""

    field: str
    key: str | None
    candidates: Mapping[str, tuple[Any, ...]]  # key-axis value (as str) -> candidate values
    seeds: tuple[int, ...]
    same_as: Mapping[str, Mapping[str, Any]]  # axis -> {value (str): representative value}

    def representative(self, axes: Mapping[str, Any]) -> dict[str, Any]:
        """The point whose tuned value ``axes`` reuses."""
        out = dict(axes)
        for k, table in self.same_as.items():
            out[k] = table.get(fmt_value(axes[k]), axes[k])
        return out

    def candidates_for(self, axes: Mapping[str, Any]) -> tuple[Any, ...]:
        if self.key is None:
            return self.candidates["*"]
        rep = self.representative(axes)
        return self.candidates["+".join(fmt_value(rep[k]) for k in self.key.split("+"))]


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cell:
    """One run of a grid."""

    stage: str  # "tune" or "main"
    axes: dict[str, Any]  # axis field -> value (ordered as in the grid)
    seed: int
    tuned: tuple[str, Any] | None  # (field, value) chosen or tried for this cell
    overrides: tuple[str, ...]  # everything on top of the base config, seed last

    @property
    def cell_id(self) -> str:
        parts = [self.stage]
        parts += [f"{short(k)}={fmt_value(v)}" for k, v in self.axes.items()]
        if self.tuned is not None:
            parts.append(f"{short(self.tuned[0])}={fmt_value(self.tuned[1])}")
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


# Display names of the ``lora.mode`` axis values (tables and plot legends).
METHOD = {"ffa": "FFA-LoRA", "lora": "LoRA"}


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
    tune = None
    if tune_raw is not None:
        _need(isinstance(tune_raw, dict), f"{path.name}: tune", "must be a mapping.")
        bad = sorted(set(tune_raw) - set(TUNE_KEYS))
        _need(not bad, f"{path.name}: tune", f"unknown keys {bad}; valid: {TUNE_KEYS}.")
        key = tune_raw.get("key")
        _need(
            key is None or all(k in axes for k in str(key).split("+")),
            f"{path.name}: tune.key",
            f"must be an axis of {list(axes)}, or several joined by '+'.",
        )
        cands = tune_raw.get("candidates")
        if quick and "candidates" in quick_raw:
            cands = quick_raw["candidates"]
        if key is None and isinstance(cands, list):
            cands = {"*": cands}
        _need(
            isinstance(cands, dict) and all(isinstance(v, list) and v for v in cands.values()),
            f"{path.name}: tune.candidates",
            "give {key-axis value: [candidate values]} (or a list without tune.key).",
        )
        cands = {
            "+".join(fmt_value(as_value(p)) for p in str(k).split("+")): tuple(v)
            for k, v in cands.items()
        }
        shared = tuple(tune_raw.get("shared_over") or ())
        _need(
            all(s in axes for s in shared),
            f"{path.name}: tune.shared_over",
            f"must name axes of {list(axes)}.",
        )
        same_raw = tune_raw.get("same_as") or {}
        _need(isinstance(same_raw, dict), f"{path.name}: tune.same_as", "give {axis: {v: w}}.")
        same: dict[str, dict[str, Any]] = {}
        for ax in shared:
            same[ax] = {fmt_value(v): axes[ax][0] for v in axes[ax]}
        for ax, table in same_raw.items():
            _need(
                ax in axes and isinstance(table, dict),
                f"{path.name}: tune.same_as.{ax}",
                f"must map values of an axis of {list(axes)} to other values of it.",
            )
            known = {fmt_value(v): v for v in axes[ax]}
            for v, w in table.items():
                w = as_value(w)
                if fmt_value(as_value(v)) in known and fmt_value(w) not in known:
                    raise ConfigError(
                        f"{path.name}: tune.same_as.{ax}.{v}={w!r} is not a value of axis {ax} "
                        f"({list(known)})."
                    )
                same.setdefault(ax, {})[fmt_value(as_value(v))] = w
        tune = Tune(
            field=str(tune_raw.get("field", "client.learning_rate")),
            key=key,
            candidates=cands,
            seeds=_seeds(tune_raw.get("seeds", [1000]), f"{path.name}: tune.seeds"),
            same_as=same,
        )
        for point in _axis_points_of(axes):
            try:
                tune.candidates_for(point)
            except KeyError as e:
                raise ConfigError(
                    f"{path.name}: tune.candidates has no entry {e.args[0]!r} (tune.key={key})."
                ) from None
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
    )
    # Every cell's config must validate before anything runs.
    for cell in tune_cells(grid) + main_cells(grid, chosen=None):
        cell_config(grid, cell, ())
    return grid


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
    if tuned is not None:
        out.append(override(*tuned))
    out.append(f"seed={seed}")
    # Research grids are reproducible by design: the noise is regenerable from the cell's seed
    # (the runs say so); none of them is a private release.
    out.append(f"privacy.noise_seed={seed}")
    return tuple(out)


def tune_group(grid: Grid, axes: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The tuning group of a point: the axis values of the point it reuses the choice of."""
    assert grid.tune is not None
    return tuple((k, fmt_value(v)) for k, v in grid.tune.representative(axes).items())


def tune_cells(grid: Grid) -> list[Cell]:
    """Every (representative point, candidate, tuning seed) cell."""
    if grid.tune is None:
        return []
    cells, seen = [], set()
    for point in _axis_points(grid):
        point = grid.tune.representative(point)
        g = tune_group(grid, point)
        if g in seen:
            continue
        seen.add(g)
        for value in grid.tune.candidates_for(point):
            tuned = (grid.tune.field, as_value(value))
            for seed in grid.tune.seeds:
                cells.append(
                    Cell(
                        stage="tune",
                        axes=point,
                        seed=seed,
                        tuned=tuned,
                        overrides=_overrides(grid, point, tuned, seed),
                    )
                )
    return cells


def main_cells(grid: Grid, chosen: Mapping[tuple, Any] | None) -> list[Cell]:
    """The reported cells. With tuning, ``chosen[tune_group]`` is the selected value (None:
    the first candidate, used only to validate configs before tuning has run)."""
    cells = []
    for point in _axis_points(grid):
        tuned = None
        if grid.tune is not None:
            g = tune_group(grid, point)
            value = chosen[g] if chosen is not None else grid.tune.candidates_for(point)[0]
            tuned = (grid.tune.field, as_value(value))
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
