"""A Flower App folder for an ffa_jax run config, and the run config's way back out of Flower.

``flwr run APP_DIR`` packages ``APP_DIR/pyproject.toml`` into a Flower App Bundle (FAB) and
sends it to the SuperLink, which hands it to the ServerApp and every ClientApp. The folder
written by :func:`write_app` holds only that file: its ``[tool.flwr.app.components]`` point at
the installed ``ffa_jax.flower.server_app:app`` and ``ffa_jax.flower.client_app:app``, and its
``[tool.flwr.app.config]`` carries the whole resolved ffa_jax config as YAML text
(``ffa-config``), so the server and every client run exactly the same, validated config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ffa_jax.config import RunConfig, from_dict
from ffa_jax.errors import ConfigError

CONFIG_KEY = "ffa-config"  # the resolved ffa_jax config (YAML text)
ROUND_TIMEOUT_KEY = "round-timeout"  # seconds the server waits for the clients of a round
NODE_TIMEOUT_KEY = "node-timeout"  # seconds the server waits for all SuperNodes to connect
OVERWRITE_KEY = "overwrite"  # replace an existing run directory

SERVER_APP = "ffa_jax.flower.server_app:app"
CLIENT_APP = "ffa_jax.flower.client_app:app"
PUBLISHER = "ffa-jax"


def _toml_string(text: str) -> str:
    """A TOML basic string holding ``text`` exactly (escapes quotes, backslashes, controls)."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def run_config(
    cfg: RunConfig,
    *,
    round_timeout: float = 1800.0,
    node_timeout: float = 300.0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The Flower run config (``[tool.flwr.app.config]``) of an app that runs ``cfg``.

    Args:
      cfg: the ffa_jax run config, carried as YAML text (``ffa-config``).
      round_timeout: seconds the server waits for all clients of one round.
      node_timeout: seconds the server waits for ``federated.clients`` SuperNodes.
      overwrite: the server replaces an existing run directory.
    """
    for name, value in (("round_timeout", round_timeout), ("node_timeout", node_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{name}={value!r} must be a positive number of seconds.")
    return {
        ROUND_TIMEOUT_KEY: float(round_timeout),
        NODE_TIMEOUT_KEY: float(node_timeout),
        OVERWRITE_KEY: bool(overwrite),
        CONFIG_KEY: cfg.to_yaml(),
    }


def app_pyproject(cfg: RunConfig, **kwargs: Any) -> str:
    """The ``pyproject.toml`` of a Flower App that runs ``cfg`` (see the module docstring);
    ``kwargs`` go to :func:`run_config`."""
    rc = run_config(cfg, **kwargs)
    project = "ffa-jax-" + "".join(c if c.isalnum() else "-" for c in cfg.name.lower())
    return "\n".join(
        [
            "# A Flower App for one ffa_jax run config, written by `ffa-jax flower app`.",
            "# Run it with `flwr run <this folder> <superlink-connection>`; every node needs",
            '# ffa_jax installed (pip install "ffa_jax[flower]").',
            "[project]",
            f'name = "{project}"',
            'version = "1.0.0"',
            'description = "ffa_jax: private federated fine-tuning with FFA-LoRA on Flower"',
            'license = "Apache-2.0"',
            'dependencies = ["ffa_jax[flower]"]',
            "",
            "[tool.flwr.app]",
            f'publisher = "{PUBLISHER}"',
            "",
            "[tool.flwr.app.components]",
            f'serverapp = "{SERVER_APP}"',
            f'clientapp = "{CLIENT_APP}"',
            "",
            "[tool.flwr.app.config]",
            f"{ROUND_TIMEOUT_KEY} = {rc[ROUND_TIMEOUT_KEY]!r}",
            f"{NODE_TIMEOUT_KEY} = {rc[NODE_TIMEOUT_KEY]!r}",
            f"{OVERWRITE_KEY} = {'true' if rc[OVERWRITE_KEY] else 'false'}",
            f"{CONFIG_KEY} = {_toml_string(rc[CONFIG_KEY])}",
            "",
        ]
    )


def check_supported(cfg: RunConfig) -> RunConfig:
    """``cfg`` if the Flower deployment runs it: sample-level DP (or none) with every client
    in every round.

    Raises:
      ConfigError: client-level DP or partial participation (simulation-only for now).
    """
    if cfg.privacy.enabled and cfg.privacy.unit != "sample":
        raise ConfigError(
            f"privacy.unit={cfg.privacy.unit!r} is not supported by the Flower deployment yet "
            "(the server would have to clip and noise client updates): use privacy.unit=sample, "
            "or run client-level DP in simulation with `ffa-jax train`."
        )
    m = cfg.federated.clients_per_round
    if m is not None and m != cfg.federated.clients:
        raise ConfigError(
            f"federated.clients_per_round={m} is not supported by the Flower deployment yet "
            "(every SuperNode trains every round): drop the override, or run partial "
            "participation in simulation with `ffa-jax train`."
        )
    return cfg


def write_app(cfg: RunConfig, out_dir: str | Path, **kwargs: Any) -> Path:
    """Writes the Flower App folder for ``cfg`` (``out_dir/pyproject.toml``) and returns it.

    ``kwargs`` go to :func:`app_pyproject`. An existing ``pyproject.toml`` is replaced
    (atomically); nothing else in ``out_dir`` is touched.
    """
    from ffa_jax.fileio import atomic_write_text as _atomic_write

    check_supported(cfg)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{str(out)!r} is a file; pass a folder for the Flower App.")
    _atomic_write(out / "pyproject.toml", app_pyproject(cfg, **kwargs))
    return out


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The ffa_jax config carried by a Flower run config (``ffa-config``), validated.

    Raises:
      ConfigError: the key is missing or its YAML is not a valid ffa_jax config.
    """
    text = run_config.get(CONFIG_KEY)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(
            f"the Flower run config has no {CONFIG_KEY!r} string; run a Flower App written by "
            "`ffa-jax flower app OUT_DIR --config ...` (its pyproject.toml carries the config)."
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"the Flower run config's {CONFIG_KEY!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(
            f"the Flower run config's {CONFIG_KEY!r} must be a YAML mapping of config sections."
        )
    return check_supported(from_dict(RunConfig, data))


def positive_seconds(run_config: Mapping[str, Any], key: str, default: float) -> float:
    """A positive number of seconds from the Flower run config (``default`` when absent)."""
    value = run_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(
            f"Flower run config {key}={value!r} must be a positive number of seconds."
        )
    return float(value)
