"""A Flower App folder for an ffa_jax run config, and the run config's way back out of Flower.

``flwr run APP_DIR`` packages ``APP_DIR/pyproject.toml`` into a Flower App Bundle (FAB) and
sends it to the SuperLink, which hands it to the ServerApp and every ClientApp. The folder
written by :func:`write_app` holds only that file: its ``[tool.flwr.app.components]`` point at
the installed ``ffa_jax.flower.server_app:app`` and ``ffa_jax.flower.client_app:app``, and its
``[tool.flwr.app.config]`` carries

- the main fields as Flower run-config keys (:data:`RUN_CONFIG_KEYS`: ``num-server-rounds``,
  ``epsilon``, ``clip-norm``, ``learning-rate``, ``local-steps``, ``mode``, ...), which
  ``flwr run APP_DIR --run-config "num-server-rounds=5 epsilon=4.0"`` overrides as in any
  Flower app;
- the rest of the resolved ffa_jax config as YAML text (``ffa-config``), the base the keys
  are applied to;
- the deployment's own keys (``round-timeout``, ``node-timeout``, ``overwrite``,
  ``resume``).

The server and every client read the same run config (Flower sends the overridden one to all
of them), so they run exactly the same, validated config. A key that is none of these is
refused by name.
"""

from __future__ import annotations

import hashlib
import math
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
RESUME_KEY = "resume"  # continue the run directory from its newest ServerApp checkpoint

#: Flower run-config key -> ffa_jax config field. ``clients-per-round = 0`` means every
#: client in every round (``federated.clients_per_round: null``; TOML has no null).
RUN_CONFIG_KEYS: dict[str, str] = {
    "num-server-rounds": "federated.rounds",
    "num-clients": "federated.clients",
    "clients-per-round": "federated.clients_per_round",
    "client-sampling": "federated.client_sampling",
    "local-steps": "federated.local_steps",
    "mode": "lora.mode",
    "rank": "lora.rank",
    "learning-rate": "client.learning_rate",
    "batch-size": "client.batch_size",
    "server-learning-rate": "server.learning_rate",
    "server-schedule": "server.schedule",
    "privacy-unit": "privacy.unit",
    "epsilon": "privacy.epsilon",
    "delta": "privacy.delta",
    "clip-norm": "privacy.clip_norm",
    "client-clip-norm": "privacy.client_clip_norm",
    "seed": "seed",
    "name": "name",
}
#: The deployment's own keys (not ffa_jax config fields).
DEPLOYMENT_KEYS = (CONFIG_KEY, ROUND_TIMEOUT_KEY, NODE_TIMEOUT_KEY, OVERWRITE_KEY, RESUME_KEY)

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


def _field(cfg: RunConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def run_config(
    cfg: RunConfig,
    *,
    round_timeout: float = 1800.0,
    node_timeout: float = 300.0,
    overwrite: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """The Flower run config (``[tool.flwr.app.config]``) of an app that runs ``cfg``.

    Args:
      cfg: the ffa_jax run config: its main fields as :data:`RUN_CONFIG_KEYS`, the whole
        config as YAML text (``ffa-config``, the base those keys override).
      round_timeout: seconds the server waits for all clients of one round.
      node_timeout: seconds the server waits for ``federated.clients`` SuperNodes.
      overwrite: the server replaces an existing run directory.
      resume: the server continues the run directory from its newest checkpoint.
    """
    for name, value in (("round_timeout", round_timeout), ("node_timeout", node_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{name}={value!r} must be a positive number of seconds.")
    out: dict[str, Any] = {}
    for key, dotted in RUN_CONFIG_KEYS.items():
        value = _field(cfg, dotted)
        if key == "clients-per-round" and value is None:
            value = 0
        out[key] = float(value) if isinstance(value, float) else value
    out.update(
        {
            ROUND_TIMEOUT_KEY: float(round_timeout),
            NODE_TIMEOUT_KEY: float(node_timeout),
            OVERWRITE_KEY: bool(overwrite),
            RESUME_KEY: bool(resume),
            CONFIG_KEY: cfg.to_yaml(),
        }
    )
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return str(int(value))


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
            '# Override any of these with flwr run <app> --run-config "key=value ...".',
            *(f"{key} = {_toml_value(rc[key])}" for key in RUN_CONFIG_KEYS),
            "# The rest of the ffa_jax config (the base the keys above override).",
            f"{CONFIG_KEY} = {_toml_string(rc[CONFIG_KEY])}",
            "# The deployment: seconds to wait, replace or resume the run directory.",
            *(f"{key} = {_toml_value(rc[key])}" for key in DEPLOYMENT_KEYS[1:]),
            "",
        ]
    )


def check_supported(cfg: RunConfig) -> RunConfig:
    """``cfg`` if the Flower deployment runs it: no DP, sample-level DP with every client in
    every round, or client-level DP / no DP with partial participation
    (``federated.clients_per_round``).

    Raises:
      ConfigError: a ``lora.mode`` other than ffa and lora (the variants of
        docs/variants.md run in simulation); sample-level DP with partial participation.
        The simulation calibrates each client's sigma_k to the number of rounds it actually
        takes part in, which only the server's secret schedule knows; a Flower client is
        never told that schedule.
    """
    if cfg.lora.mode not in ("ffa", "lora"):
        raise ConfigError(
            f"lora.mode={cfg.lora.mode!r} is not supported by the Flower deployment, whose "
            "messages carry the whole trainable tree every round and whose server averages it "
            "(FedAvg) into a plain LoRA adapter: use lora.mode ffa or lora, or run the variant "
            "in simulation with `ffa-jax train` (docs/variants.md)."
        )
    m = cfg.federated.clients_per_round
    if cfg.federated.partial and cfg.privacy.enabled and cfg.privacy.unit == "sample":
        raise ConfigError(
            f"federated.clients_per_round={m} with privacy.unit='sample' is not supported by "
            "the Flower deployment (a client would need the server's secret schedule to "
            "calibrate its noise to the rounds it takes part in): use privacy.unit=client "
            "(the server clips and noises the updates), drop clients_per_round, or run it in "
            "simulation with `ffa-jax train`."
        )
    return cfg


def write_app(cfg: RunConfig, out_dir: str | Path, **kwargs: Any) -> Path:
    """Writes the Flower App folder for ``cfg`` (``out_dir/pyproject.toml``) and returns it.

    ``kwargs`` go to :func:`app_pyproject`. An existing ``pyproject.toml`` is replaced
    (atomically); nothing else in ``out_dir`` is touched.
    """
    from ffa_jax.fileio import atomic_write_text

    check_supported(cfg)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{str(out)!r} is a file; pass a folder for the Flower App.")
    atomic_write_text(out / "pyproject.toml", app_pyproject(cfg, **kwargs))
    return out


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The ffa_jax config of a Flower run config, validated: ``ffa-config`` (YAML) with the
    :data:`RUN_CONFIG_KEYS` present applied on top.

    Raises:
      ConfigError: a key is neither a run-config key nor a deployment key (named, with the
        valid ones), ``ffa-config`` is missing or not a valid config, or a value is invalid
        (named by its ffa_jax field, e.g. ``privacy.epsilon``).
    """
    unknown = sorted(k for k in run_config if k not in RUN_CONFIG_KEYS and k not in DEPLOYMENT_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown Flower run-config key(s) {unknown}; valid keys are "
            f"{sorted([*RUN_CONFIG_KEYS, *DEPLOYMENT_KEYS])} (see docs/federation.md)."
        )
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
    for key, dotted in RUN_CONFIG_KEYS.items():
        if key not in run_config:
            continue
        value = run_config[key]
        if key == "clients-per-round" and value == 0 and not isinstance(value, bool):
            value = None  # 0: every client in every round
        *sections, field = dotted.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"the Flower run config's {CONFIG_KEY!r}: {section} is not a mapping."
                )
        node[field] = value
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as e:
        keys = [k for k, d in RUN_CONFIG_KEYS.items() if k in run_config and d in str(e)]
        if keys:
            raise ConfigError(f"Flower run-config key {keys[0]!r}: {e}") from e
        raise
    return check_supported(cfg)


def config_digest(cfg: RunConfig) -> str:
    """SHA-256 of the resolved config's YAML (a node-level cache key)."""
    return hashlib.sha256(cfg.to_yaml().encode()).hexdigest()


def positive_seconds(run_config: Mapping[str, Any], key: str, default: float) -> float:
    """A positive number of seconds from the Flower run config (``default`` when absent)."""
    value = run_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(
            f"Flower run config {key}={value!r} must be a positive number of seconds."
        )
    return float(value)
