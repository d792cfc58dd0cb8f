"""Run configuration: frozen, keyword-only dataclasses, loaded from YAML, overridden from the CLI.

One name per concept, used in the YAML files, in ``--set section.field=value`` overrides, in the
docs and in the code: e.g. ``lora.mode``, ``lora.rank``, ``lora.alpha``, ``privacy.epsilon``,
``privacy.delta``, ``privacy.clip_norm``, ``privacy.unit``, ``privacy.client_clip_norm``,
``privacy.max_epsilon``, ``federated.clients``, ``federated.clients_per_round``,
``federated.client_sampling``, ``federated.rounds``, ``federated.local_steps``,
``data.partition``, ``seed``.

Every section validates itself on construction and raises :class:`ffa_jax.errors.ConfigError`
naming the field, the bad value and the fix. Cross-section checks live in
:meth:`RunConfig.__post_init__`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ffa_jax.errors import ConfigError

# ffa/lora: the paper's; the rest: the federated variants that followed it
# (ffa_jax.federated.modes).
LORA_MODES = ("ffa", "lora", "fedsa", "rolora", "fedsb", "fedex", "fedsvd", "flora")
A_INITS = ("uniform", "gaussian", "orthogonal")
SB_INITS = ("svd", "random")
DEFAULT_TARGETS = r".*(query|value|q_proj|v_proj)/kernel"
POOLINGS = ("auto", "cls", "mean")
MODEL_FAMILIES = ("auto", "encoder", "llama", "vit")
MODEL_DTYPES = ("float32", "bfloat16")
PARTITIONS = ("iid", "label_mix", "dirichlet")
CLIENT_OPTIMIZERS = ("sgd", "momentum", "adam")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi")
SERVER_SCHEDULES = ("constant", "cosine")
WEIGHTINGS = ("uniform", "examples")
ACCOUNTANTS = ("pld", "rdp")
PRIVACY_UNITS = ("sample", "client")
CLIENT_SAMPLINGS = ("poisson", "fixed")
NOISE_MECHANISMS = ("gaussian", "banded_mf")
PAPER_LABEL_MIX_2 = ((0.1, 0.9), (0.9, 0.1), (0.5, 0.5))


# perf.microbatch_size / perf.clients_per_chunk: chosen per run by ffa_jax.perf.resolve.
AUTO = "auto"
# Validation metrics that may select a run's reported round (higher is better).
SELECT_METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "auc")
# eval.dtype: "model" = the training compute dtype (model.dtype).
EVAL_DTYPES = ("model", "bfloat16")
# perf.cpu_library_fusion values (see ffa_jax.xla_options).
CPU_LIBRARY_FUSIONS = ("auto", "jax", "dots", "off")

# The closed sets of values, by the field that takes one (``ffa-jax config --schema`` and
# docs/configuration.md list them; the validators check the same tuples).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.pooling": POOLINGS,
    "model.family": MODEL_FAMILIES,
    "model.dtype": MODEL_DTYPES,
    "lora.mode": LORA_MODES,
    "lora.a_init": A_INITS,
    "lora.sb_init": SB_INITS,
    "data.partition": PARTITIONS,
    "federated.weighting": WEIGHTINGS,
    "federated.client_sampling": CLIENT_SAMPLINGS,
    "client.optimizer": CLIENT_OPTIMIZERS,
    "server.optimizer": SERVER_OPTIMIZERS,
    "server.schedule": SERVER_SCHEDULES,
    "privacy.accountant": ACCOUNTANTS,
    "privacy.unit": PRIVACY_UNITS,
    "privacy.mechanism": NOISE_MECHANISMS,
    "perf.cpu_library_fusion": CPU_LIBRARY_FUSIONS,
    "eval.select_metric": SELECT_METRICS,
    "eval.dtype": EVAL_DTYPES,
}


def _require(cond: bool, field: str, value: Any, fix: str) -> None:
    if not cond:
        raise ConfigError(f"{field}={value!r} is invalid: {fix}")


def _check_name_and_seed(name: Any, seed: Any, folder: str) -> None:
    _require(
        isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.\-]+", name or "") is not None,
        "name",
        name,
        f"use letters, digits, '_', '-' or '.' (it names the {folder} folder).",
    )
    _require(
        isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
        "seed",
        seed,
        "must be an integer >= 0.",
    )


def _positive_int(field: str, value: Any) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        field,
        value,
        "must be a positive integer.",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The pretrained model.

    Attributes:
      name: encoders: ``"minilm"`` (the offline all-MiniLM-L6-v2 wheel), a local HF model
        folder (``config.json`` + safetensors), or a hub id such as ``roberta-large`` (needs
        internet). LLaMA-family decoders: ``"smollm2"`` (the offline SmolLM2-135M-Instruct
        wheel), a ``.gguf`` file, a local HF folder, or a hub id (with ``family: llama``).
      family: which model family (and so which workload, see :mod:`ffa_jax.workloads`):
        ``encoder`` (BERT/RoBERTa text classification), ``llama`` (LLaMA-family causal LM on
        a GSM task), ``vit`` (ViT image classification) or ``auto``: ``llama`` for
        ``smollm2``, ``.gguf`` files and local folders whose ``config.json`` has a LLaMA
        ``model_type``, ``vit`` for local folders with ``model_type: vit``, else ``encoder``.
        Hub ids are not looked up: set ``family: llama`` or ``family: vit`` for hub models.
      max_length: tokens per example (padded/truncated for encoders; for decoders prompt +
        answer + EOS, longer training examples are dropped, and the evaluation prompts must
        fit).
      train_head: also train (and upload) the final classification layer (``classifier/*``).
        Off by default, as in the paper; then only LoRA matrices are trained. Encoders and
        ViTs.
      pooling: what the head reads: ``cls`` (first token, HF sequence classification),
        ``mean`` (mean of token states, as sentence-transformers models are trained) or
        ``auto`` (``mean`` when the model folder has a sentence-transformers
        ``1_Pooling/config.json`` asking for it, else ``cls``). Encoders only.
      dtype: dtype of the frozen base weights and of the computation (``float32`` or
        ``bfloat16``, e.g. for LLaMA-7B, or any family on TPU/GPU); LoRA factors, a trained
        head, gradients, clipping, noise and aggregation stay float32, as do norms, softmax
        and logits. Every family (encoder, llama, vit).
      new_head: initialise the classification head from the seed even when the checkpoint
        has one with the task's label count (a new task with the same number of labels, e.g.
        a ViT pretrained on digits 0-4 fine-tuned on 5-9). ViT models only.
    """

    name: str = "minilm"
    family: str = "auto"
    max_length: int = 64
    train_head: bool = False
    pooling: str = "auto"
    dtype: str = "float32"
    new_head: bool = False

    def __post_init__(self):
        _require(
            isinstance(self.name, str) and self.name != "",
            "model.name",
            self.name,
            "give 'minilm', a local model folder or a hub id.",
        )
        _positive_int("model.max_length", self.max_length)
        _require(self.pooling in POOLINGS, "model.pooling", self.pooling, f"use one of {POOLINGS}.")
        _require(
            self.family in MODEL_FAMILIES,
            "model.family",
            self.family,
            f"use one of {MODEL_FAMILIES}.",
        )
        _require(
            self.dtype in MODEL_DTYPES, "model.dtype", self.dtype, f"use one of {MODEL_DTYPES}."
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """LoRA / FFA-LoRA adapters (see :mod:`ffa_jax.lora`).

    Attributes:
      mode: ``"ffa"`` (A frozen at its shared random init, only B trained and sent),
        ``"lora"`` (A and B trained and averaged separately), or one of the federated
        variants of :mod:`ffa_jax.federated.modes` (docs/variants.md): ``"fedsa"`` (A and B
        trained, only A sent and averaged, each client keeps its own B), ``"rolora"`` (rounds
        alternate: B trained with A fixed, then A with B fixed; only the trained factor is
        sent), ``"fedsb"`` (A and B frozen, an r x r matrix between them trained and sent),
        ``"fedex"`` (A and B averaged, the residual of exact aggregation folded into the base
        weight), ``"fedsvd"`` (B trained, the server re-factorises B A by SVD every round),
        ``"flora"`` (the clients' products summed into the base weight, A and B
        re-initialised every round).
      rank: r.
      alpha: the update is ``(alpha / r) * B A``.
      targets: regular expression fullmatched against ``/``-joined parameter paths.
      a_init: ``uniform`` (PEFT default, ``U(-1/sqrt(d_in), 1/sqrt(d_in))``), ``gaussian``,
        ``orthogonal``.
      init_from: a PEFT LoRA adapter folder (``adapter_config.json`` +
        ``adapter_model.safetensors``, e.g. trained elsewhere or by ``ffa-jax export-peft``) to
        start from instead of ``a_init`` and B = 0: its A, B and saved head are loaded
        (:func:`ffa_jax.models.peft.init_from_adapter`); ``rank``, ``alpha`` and ``targets``
        must match the adapter's ``r``, ``lora_alpha`` and adapted modules. The adapter is
        treated as public, like the pretrained weights. null: start fresh.
      sb_init: ``lora.mode: fedsb`` only: how the frozen A and B are drawn. ``svd``: the top-r
        singular vectors of each (public) pretrained kernel; ``random``: A as ``a_init``, B
        with orthonormal rows, from the public seed.
      client_ranks: heterogeneous client ranks, one per client (``federated.clients`` of
        them, each in ``1..rank``): client k trains and sends a rank-``client_ranks[k]``
        adapter (zero-padded to ``rank`` in the jitted round). ``lora.mode: flora`` only
        (its server rule stacks the products exactly whatever the ranks; the others are
        refused by name). null: every client has rank ``rank``.
    """

    mode: str = "ffa"
    rank: int = 8
    alpha: float = 8.0
    targets: str = DEFAULT_TARGETS
    a_init: str = "uniform"
    init_from: str | None = None
    sb_init: str = "svd"
    client_ranks: tuple[int, ...] | None = None

    def __post_init__(self):
        _require(self.mode in LORA_MODES, "lora.mode", self.mode, f"use one of {LORA_MODES}.")
        _positive_int("lora.rank", self.rank)
        _require(
            _is_number(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0,
            "lora.alpha",
            self.alpha,
            "must be a positive finite number, e.g. 8.",
        )
        _require(self.a_init in A_INITS, "lora.a_init", self.a_init, f"use one of {A_INITS}.")
        _require(self.sb_init in SB_INITS, "lora.sb_init", self.sb_init, f"use one of {SB_INITS}.")
        _require(
            self.client_ranks is None
            or (
                len(self.client_ranks) > 0
                and all(
                    isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= self.rank
                    for r in self.client_ranks
                )
            ),
            "lora.client_ranks",
            self.client_ranks,
            f"give one integer rank in 1..lora.rank={self.rank} per client, or null.",
        )
        _require(
            self.init_from is None or (isinstance(self.init_from, str) and self.init_from != ""),
            "lora.init_from",
            self.init_from,
            "must be a PEFT adapter folder (a path) or null.",
        )
        try:
            re.compile(self.targets)
        except (re.error, TypeError) as e:
            raise ConfigError(
                f"lora.targets={self.targets!r} is not a valid regular expression: {e}"
            ) from e

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The task and its split into clients.

    Attributes:
      task: ``"spamassassin"`` (shipped), a local ``.jsonl/.json/.csv/.parquet`` file with
        ``text_field``/``label_field`` columns, or a HF datasets name (needs internet).
      partition: ``iid``, ``label_mix`` (row k of ``label_mix`` is client k's label
        distribution, the paper's non-IID setting) or ``dirichlet`` (``dirichlet_alpha``).
        A Dirichlet split is drawn again (from the same public seed's stream) until every
        client keeps at least ``client.batch_size`` training examples after the validation
        hold-out, as NIID-Bench redraws below its minimum: a smaller client could not be
        Poisson-sampled at q = batch / n_k <= 1. A first draw that qualifies is kept.
      test_fraction: held-out share when the task has no test split.
      split_seed: the public seed of which examples are test and which are training: the
        held-out test split (when the task has none), the ``max_train_examples`` subsample
        and the test order. Null: the run's ``seed``. Set it to one value across runs that
        must share one test split while ``seed`` varies the rest (the partition, the
        validation hold-out, A, the noise): experiment grids do, so that a tuning seed's
        training and validation examples are never another seed's test examples.
      validation_fraction: share of each client's training examples held out as the
        validation split (0: none). Drawn per client from the public ``seed`` (never the
        run's secret), so the split is the same for every method and epsilon of one seed;
        the held-out examples are not trained on (they are outside the DP guarantee's data
        set, like the test split) and are evaluated after every round (``val_*`` metrics).
        Experiment grids select hyperparameters and the reported round on it, never on test.
      max_train_examples: optional cap on training examples (stratified).
      classes: image tasks: source label ids to keep, relabelled ``0..k-1`` in this order
        (null: all), e.g. ``[5, 6, 7, 8, 9]`` for the private half of MNIST.
      image_field: image tasks: the image column of folders and HF datasets.
      cache_dir: image tasks: where resized images are cached (``auto``:
        ``$FFA_JAX_CACHE/images`` or ``~/.cache/ffa_jax/images``; null: no cache).
    """

    task: str = "spamassassin"
    partition: str = "label_mix"
    label_mix: tuple[tuple[float, ...], ...] = PAPER_LABEL_MIX_2
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2
    split_seed: int | None = None
    validation_fraction: float = 0.0
    max_train_examples: int | None = None
    text_field: str = "text"
    label_field: str = "label"
    classes: tuple[int, ...] | None = None
    image_field: str = "image"
    cache_dir: str | None = "auto"

    def __post_init__(self):
        if self.classes is not None:
            _require(
                len(self.classes) >= 2
                and len(set(self.classes)) == len(self.classes)
                and all(c >= 0 for c in self.classes),
                "data.classes",
                list(self.classes),
                "give at least two distinct label ids >= 0 of the source, e.g. [5, 6, 7, 8, 9], "
                "or null for all labels.",
            )
        _require(
            self.partition in PARTITIONS,
            "data.partition",
            self.partition,
            f"use one of {PARTITIONS}.",
        )
        _require(
            _is_number(self.dirichlet_alpha) and self.dirichlet_alpha > 0,
            "data.dirichlet_alpha",
            self.dirichlet_alpha,
            "must be > 0 (smaller = more heterogeneous), e.g. 0.5.",
        )
        if self.split_seed is not None:
            _require(
                isinstance(self.split_seed, int)
                and not isinstance(self.split_seed, bool)
                and self.split_seed >= 0,
                "data.split_seed",
                self.split_seed,
                "must be null (the run's seed) or an integer >= 0, e.g. 0.",
            )
        _require(
            _is_number(self.test_fraction) and 0 < self.test_fraction < 1,
            "data.test_fraction",
            self.test_fraction,
            "must be in (0, 1), e.g. 0.2.",
        )
        _require(
            _is_number(self.validation_fraction) and 0 <= self.validation_fraction < 0.5,
            "data.validation_fraction",
            self.validation_fraction,
            "must be in [0, 0.5): 0 for no validation split, e.g. 0.1 for 10% of each client.",
        )
        if self.max_train_examples is not None:
            _positive_int("data.max_train_examples", self.max_train_examples)
        if self.partition == "label_mix":
            _require(
                len(self.label_mix) > 0,
                "data.label_mix",
                self.label_mix,
                "give one row of label proportions per client, e.g. [[0.1, 0.9], [0.9, 0.1]].",
            )
            for k, row in enumerate(self.label_mix):
                _require(
                    all(_is_number(p) and p >= 0 for p in row) and abs(sum(row) - 1) < 1e-6,
                    f"data.label_mix[{k}]",
                    list(row),
                    "each row must be non-negative proportions that sum to 1.",
                )


@dataclasses.dataclass(frozen=True, kw_only=True)
class FederatedConfig:
    """The federation: K clients, of which M take part in each round.

    Attributes:
      clients: number of clients K (N in the client-level DP literature).
      clients_per_round: M, the (expected) number of clients taking part in a round; null =
        all K every round (cross-silo, as in the paper).
      client_sampling: how the M clients of a round are drawn (from the seed, independently of
        the data): ``poisson`` (each client independently with probability q = M / K; the
        round's client axis is padded with masked dummy clients to a fixed size) or ``fixed``
        (exactly M of K uniformly without replacement). Client-level DP accounting matches it
        (see :mod:`ffa_jax.privacy.ledger`).
      rounds: communication rounds.
      local_steps: local optimiser steps per participating client per round.
      weighting: ``uniform`` (1/M, the paper) or ``examples`` (n_k / sum of participants' n)
        for averaging updates.
    """

    clients: int = 3
    rounds: int = 10
    local_steps: int = 2
    weighting: str = "uniform"
    clients_per_round: int | None = None
    client_sampling: str = "poisson"

    def __post_init__(self):
        _positive_int("federated.clients", self.clients)
        _positive_int("federated.rounds", self.rounds)
        _positive_int("federated.local_steps", self.local_steps)
        _require(
            self.weighting in WEIGHTINGS,
            "federated.weighting",
            self.weighting,
            f"use one of {WEIGHTINGS}.",
        )
        if self.clients_per_round is not None:
            _require(
                isinstance(self.clients_per_round, int)
                and not isinstance(self.clients_per_round, bool)
                and 1 <= self.clients_per_round <= self.clients,
                "federated.clients_per_round",
                self.clients_per_round,
                f"must be an integer in [1, federated.clients={self.clients}] (at least one "
                "client per round), or null for all clients every round.",
            )
        _require(
            self.client_sampling in CLIENT_SAMPLINGS,
            "federated.client_sampling",
            self.client_sampling,
            f"use one of {CLIENT_SAMPLINGS}.",
        )

    @property
    def participants(self) -> int:
        """M: the (expected) number of clients per round."""
        return self.clients if self.clients_per_round is None else self.clients_per_round

    @property
    def partial(self) -> bool:
        """True when fewer than all clients take part in a round."""
        return self.participants < self.clients


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """Local training on each client.

    Attributes:
      optimizer: ``sgd`` (the paper), ``momentum`` or ``adam``; state is reset every round.
      learning_rate: local learning rate.
      momentum: for ``momentum``.
      batch_size: expected local batch size; under DP each example is sampled with
        probability ``batch_size / n_k`` (Poisson), without DP too (same sampler).
    """

    optimizer: str = "sgd"
    learning_rate: float = 100.0
    momentum: float = 0.9
    batch_size: int = 64

    def __post_init__(self):
        _require(
            self.optimizer in CLIENT_OPTIMIZERS,
            "client.optimizer",
            self.optimizer,
            f"use one of {CLIENT_OPTIMIZERS}.",
        )
        _require(
            _is_number(self.learning_rate) and self.learning_rate > 0,
            "client.learning_rate",
            self.learning_rate,
            "must be > 0.",
        )
        _require(
            _is_number(self.momentum) and 0 <= self.momentum < 1,
            "client.momentum",
            self.momentum,
            "must be in [0, 1).",
        )
        _positive_int("client.batch_size", self.batch_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The server optimizer applied to the averaged client update (the pseudo-gradient).

    ``sgd`` with learning rate 1 is FedAvg; ``momentum`` is FedAvgM; ``adam``/``yogi`` are
    FedAdam/FedYogi (Reddi et al., 2021; ``eps`` is their tau).

    Attributes:
      optimizer: ``sgd``, ``momentum``, ``adam`` or ``yogi``.
      learning_rate: the server step size (1 with ``sgd``: FedAvg).
      schedule: ``constant`` (the learning rate every round) or ``cosine``: round t (0-based)
        of T = ``federated.rounds`` steps with ``learning_rate * (1 + cos(pi t / T)) / 2``,
        from the full rate at the first round towards 0 at the last. A decaying server step
        lets a run settle where a constant one keeps swinging between non-IID clients' pulls.
        It scales what the server applies, after any noise: the accounting is unchanged.
      momentum: for ``momentum``.
      b1, b2, eps: for ``adam`` / ``yogi`` (``eps`` is their tau).
    """

    optimizer: str = "sgd"
    learning_rate: float = 1.0
    schedule: str = "constant"
    momentum: float = 0.9
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-3

    def __post_init__(self):
        _require(
            self.optimizer in SERVER_OPTIMIZERS,
            "server.optimizer",
            self.optimizer,
            f"use one of {SERVER_OPTIMIZERS}.",
        )
        _require(
            _is_number(self.learning_rate) and self.learning_rate > 0,
            "server.learning_rate",
            self.learning_rate,
            "must be > 0 (1.0 with sgd is FedAvg).",
        )
        _require(
            self.schedule in SERVER_SCHEDULES,
            "server.schedule",
            self.schedule,
            f"use one of {SERVER_SCHEDULES}.",
        )
        for f in ("momentum", "b1", "b2"):
            v = getattr(self, f)
            _require(_is_number(v) and 0 <= v < 1, f"server.{f}", v, "must be in [0, 1).")
        _require(_is_number(self.eps) and self.eps > 0, "server.eps", self.eps, "must be > 0.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Differential privacy of the run: which unit is protected, the budget, the mechanism.

    Attributes:
      unit: the privacy unit. ``sample`` (the paper's): DP-SGD inside every client; two
        datasets are neighbours when they differ in one example of one client; the server
        adds no noise. ``client`` (DP-FedAvg): clients train without noise, the server clips
        every participating client's whole update to ``client_clip_norm`` and noises the sum;
        neighbours differ in all the data of one client (add/remove one client, or replace
        one with ``federated.client_sampling=fixed``); the server is trusted.
      epsilon: target epsilon over the whole run (per client under ``sample``), or ``inf`` for
        no DP (no clipping, no noise).
      delta: target delta, e.g. 1e-5.
      clip_norm: per-example L2 clip norm C of the gradient of the trainable tree (``sample``).
      client_clip_norm: L2 clip norm S of a client's whole update, the delta of its trainable
        tree over a round (``client``). The quickstart's updates measured 8-14 in L2 norm
        (``client_update_norm`` in ``metrics.jsonl``); choose S near their median.
      accountant: ``pld`` (default) or ``rdp`` (dp-accounting).
      noise_multiplier: optional fixed sigma (z under ``client``); when set, epsilon is
        reported, not targeted.
      max_epsilon: optional hard cap on the epsilon the run may spend (with ``accountant``): a
        run (or a resumed run) that would spend more refuses to start. null = no cap beyond
        ``epsilon``.
      noise_seed: null (default): the noise, the Poisson batches and the client sampling come
        from a 256-bit secret drawn from the operating system when the run starts and kept
        only in its checkpoints (see :mod:`ffa_jax.privacy.secret`). An integer >= 0 makes
        them reproducible from it, for research: the run is then NOT a private release unless
        this seed stays secret (its outputs say so). ``seed`` never decides the noise.
      mechanism: ``gaussian`` (default): independent Gaussian noise every round/step.
        ``banded_mf``: correlated noise from a banded matrix factorization (BandMF,
        Choquette-Choo et al., NeurIPS 2023) through jax-privacy's matrix-factorization
        privatizer: the same (epsilon, delta) with less error on the sum of the updates
        over many rounds / steps. Under ``unit=client`` (DP-FedAvg over rounds) it needs
        ``federated.client_sampling=poisson`` with ``clients_per_round x bands <=
        clients`` (cyclic Poisson: the clients are split into ``bands`` fixed groups and
        round t samples from group t mod bands). Under ``unit=sample`` every client's
        DP-SGD over all its ``rounds x local_steps`` steps uses correlated noise and
        cyclic Poisson batches (its examples split into ``bands`` groups; step t samples
        from group t mod bands); it needs every client in every round
        (``federated.clients_per_round`` null or = clients) and ``client.batch_size <=
        n_k // bands`` for every client k (checked when the data is partitioned).
      bands: b, the number of bands of the BandMF strategy matrix (and the cycle length of
        the cyclic Poisson sampling); 1 <= b <= federated.rounds (``unit=client``) or
        <= federated.rounds x federated.local_steps (``unit=sample``). ``bands=1`` is
        independent Gaussian noise. Must stay 1 with ``mechanism=gaussian``.
    """

    epsilon: float = 6.0
    delta: float = 1e-5
    clip_norm: float = 0.1
    accountant: str = "pld"
    noise_multiplier: float | None = None
    unit: str = "sample"
    client_clip_norm: float = 5.0
    max_epsilon: float | None = None
    noise_seed: int | None = None
    mechanism: str = "gaussian"
    bands: int = 1

    def __post_init__(self):
        _require(
            self.mechanism in NOISE_MECHANISMS,
            "privacy.mechanism",
            self.mechanism,
            f"use one of {NOISE_MECHANISMS}.",
        )
        _positive_int("privacy.bands", self.bands)
        _require(
            self.mechanism == "banded_mf" or self.bands == 1,
            "privacy.bands",
            self.bands,
            "bands only apply to privacy.mechanism=banded_mf; set privacy.mechanism=banded_mf "
            "or leave privacy.bands at 1.",
        )
        if self.noise_seed is not None:
            _require(
                isinstance(self.noise_seed, int)
                and not isinstance(self.noise_seed, bool)
                and self.noise_seed >= 0,
                "privacy.noise_seed",
                self.noise_seed,
                "must be an integer >= 0 (a reproducible, NOT private run), or null (the "
                "default: a secret drawn from the operating system).",
            )
        _require(
            _is_number(self.epsilon) and self.epsilon > 0 and not math.isnan(self.epsilon),
            "privacy.epsilon",
            self.epsilon,
            "must be > 0, or 'inf' for a non-private run.",
        )
        _require(
            _is_number(self.delta) and 0 < self.delta < 1,
            "privacy.delta",
            self.delta,
            "must be in (0, 1), e.g. 1e-5 (well below 1/n).",
        )
        _require(
            _is_number(self.clip_norm) and 0 < self.clip_norm < math.inf,
            "privacy.clip_norm",
            self.clip_norm,
            "must be a positive finite number.",
        )
        _require(
            _is_number(self.client_clip_norm) and 0 < self.client_clip_norm < math.inf,
            "privacy.client_clip_norm",
            self.client_clip_norm,
            "must be a positive finite number (the L2 bound of one client's update).",
        )
        _require(
            self.accountant in ACCOUNTANTS,
            "privacy.accountant",
            self.accountant,
            f"use one of {ACCOUNTANTS}.",
        )
        _require(
            self.unit in PRIVACY_UNITS,
            "privacy.unit",
            self.unit,
            f"use one of {PRIVACY_UNITS} (one example of one client, or one whole client).",
        )
        if self.noise_multiplier is not None:
            _require(
                _is_number(self.noise_multiplier) and self.noise_multiplier > 0,
                "privacy.noise_multiplier",
                self.noise_multiplier,
                "must be > 0, or null to calibrate it to privacy.epsilon.",
            )
        if self.max_epsilon is not None:
            _require(
                _is_number(self.max_epsilon)
                and self.max_epsilon > 0
                and not math.isnan(self.max_epsilon),
                "privacy.max_epsilon",
                self.max_epsilon,
                "must be > 0, or null for no cap.",
            )
            _require(
                self.enabled,
                "privacy.max_epsilon",
                self.max_epsilon,
                "a cap needs a private run, and this one is not private (privacy.epsilon=inf "
                "spends an infinite epsilon); set privacy.epsilon or privacy.noise_multiplier, "
                "or drop privacy.max_epsilon.",
            )
            _require(
                self.noise_multiplier is not None or self.epsilon <= self.max_epsilon,
                "privacy.max_epsilon",
                self.max_epsilon,
                f"the cap is below the target privacy.epsilon={self.epsilon:g}; lower "
                "privacy.epsilon or raise the cap.",
            )

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.epsilon) or self.noise_multiplier is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation on the held-out test split.

    Attributes:
      every: evaluate every this many rounds (0: only after the last round).
      max_examples: evaluate on the first this many test examples (None: all; GSM tasks keep
        a seeded random subset of this size).
      batch_size: evaluation batch size (at most; the batches are balanced so that the last
        one is barely padded). ``auto`` (default): the training batch capacity B_max, which a
        forward pass alone fits wherever a training step of that batch fits
        (:func:`ffa_jax.perf.resolve`).
      baseline: also evaluate the pretrained model (LoRA B = 0) before the first round; it is
        logged as round 0 in ``metrics.jsonl`` and shown in ``summary.md``.
      max_new_tokens: decoders: greedy generation stops at EOS or after this many tokens.
      select_metric: with a validation split (``data.validation_fraction``): the validation
        metric (higher is better) whose best round (earliest on ties) is the run's selected
        round; that round's model is evaluated once on the test split at the end
        (``selected_test_*`` in the summary), next to the last round's test metrics.
      test: evaluate on the test split at all (after the last round, every ``every`` rounds,
        at the validation-selected round). ``false``: the validation split only, for the
        tuning runs of an experiment grid, which must not read the test split
        (``ffa-jax experiment`` sets it there); the summary then holds no test metrics.
        Decoders refuse it.
      dtype: compute dtype of the evaluation forward passes of classifiers (encoders, ViTs):
        ``model`` (default) computes as training does (``model.dtype``); ``bfloat16`` halves
        their activation memory and is faster on GPUs/TPUs (on a CPU, XLA has no fast
        bfloat16 matmuls: slower there). Training, the weights and the LoRA factors are
        unchanged; only the reported metrics can move (by rounding). Decoders refuse it.
    """

    every: int = 5
    max_examples: int | None = None
    batch_size: int | str = AUTO
    baseline: bool = False
    max_new_tokens: int = 256
    select_metric: str = "balanced_accuracy"
    test: bool = True
    dtype: str = "model"

    def __post_init__(self):
        _require(isinstance(self.test, bool), "eval.test", self.test, "use true or false.")
        _require(
            self.dtype in EVAL_DTYPES,
            "eval.dtype",
            self.dtype,
            f"use one of {EVAL_DTYPES} (model: as training computes).",
        )
        _require(
            isinstance(self.every, int) and self.every >= 0,
            "eval.every",
            self.every,
            "must be an integer >= 0.",
        )
        if self.max_examples is not None:
            _positive_int("eval.max_examples", self.max_examples)
        if self.batch_size != AUTO:
            _positive_int("eval.batch_size", self.batch_size)
        _positive_int("eval.max_new_tokens", self.max_new_tokens)
        _require(
            self.select_metric in SELECT_METRICS,
            "eval.select_metric",
            self.select_metric,
            f"use one of {SELECT_METRICS} (a validation metric, higher is better).",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerfConfig:
    """Knobs that change speed and memory, never results or privacy.

    Attributes:
      clients_per_chunk: clients run in parallel (vmapped) at once; the rest are scanned.
        0 = all clients at once. Memory grows linearly with it. ``auto`` (default): 1 on a
        single CPU process (so skipped padding stays skipped), all clients on GPU / TPU
        (:func:`ffa_jax.perf.resolve`).
      microbatch_size: per-example gradients in chunks of this many examples (0 = whole
        batch); chunks without a real example are skipped. The padded batch B_max is rounded
        up to a multiple of it. ``auto`` (default): 16 on a single CPU process, the whole
        batch on GPU / TPU (B_max is a multiple of 16 either way, see :mod:`ffa_jax.perf`).
      devices: devices on the ``clients`` mesh axis (0 = the largest count that divides the
        chunk size and fits next to the model axis).
      model_devices: devices on the ``model`` mesh axis, over which the frozen base weights
        (large kernels and embeddings) are sharded fsdp-style, for models that do not fit one
        device (e.g. LLaMA-7B on 8 accelerators: ``devices: 1, model_devices: 8``). 1 = every
        device holds the whole frozen tree. With > 1 the weights are loaded into host memory
        and each device receives only its shards (host RAM holds the frozen tree once, no
        device ever holds all of it). ``devices x model_devices`` must not exceed the
        device count. Trainable LoRA factors, optimizer state and client batches are not
        sharded over it. Each model group is made of one process's devices, so with
        ``--distributed`` it must divide every host's local device count (e.g. 4 on a TPU
        v4-32 slice: 4 hosts x 4 chips, one group per host; the ``clients`` axis then spans
        the hosts); otherwise a ``ConfigError`` stops the run before anything is loaded.
      remat: decoders: recompute each layer's activations in the backward pass
        (``jax.checkpoint``): less memory, more compute, identical results.
      cpu_library_fusion: which kernels XLA:CPU uses for the training step's matmuls
        (:mod:`ffa_jax.xla_options`): ``auto`` (measured best per model family), ``jax``
        (XLA's default: YNNPACK with fused elementwise ops), ``dots`` (YNNPACK, matmuls
        only) or ``off`` (XLA's own kernels). CPU only; same results to float rounding.
      compilation_cache: ``ffa-jax train`` keeps compiled executables in JAX's persistent
        cache (``$XDG_CACHE_HOME/ffa_jax/jax_cache``, see
        :func:`ffa_jax.xla_options.enable_compilation_cache`), so a rerun of the same shapes
        does not compile again. ``FFA_JAX_COMPILATION_CACHE=0`` also turns it off. Library
        calls of ``train()`` leave JAX's settings alone.

    With ``clients_per_chunk: 1`` and a small ``microbatch_size`` the padded slots of a
    Poisson batch cost nothing (empty micro-batches are skipped), so a step costs about the
    sampled batch size, not its fixed capacity B_max: what ``auto`` picks on CPU.
    """

    clients_per_chunk: int | str = AUTO
    microbatch_size: int | str = AUTO
    devices: int = 0
    model_devices: int = 1
    remat: bool = False
    cpu_library_fusion: str = "auto"
    compilation_cache: bool = True

    def __post_init__(self):
        _require(
            self.cpu_library_fusion in CPU_LIBRARY_FUSIONS,
            "perf.cpu_library_fusion",
            self.cpu_library_fusion,
            f"must be one of {CPU_LIBRARY_FUSIONS}.",
        )
        for f in ("clients_per_chunk", "microbatch_size"):
            v = getattr(self, f)
            _require(
                v == AUTO or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                f"perf.{f}",
                v,
                f"must be '{AUTO}' (the default: chosen for the backend, see ffa_jax.perf) or "
                "an integer >= 0 (0 = "
                + ("all clients at once)." if f == "clients_per_chunk" else "the whole batch)."),
            )
        for f in ("devices",):
            v = getattr(self, f)
            _require(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                f"perf.{f}",
                v,
                "must be an integer >= 0 (0 = automatic).",
            )
        _positive_int("perf.model_devices", self.model_devices)
        _require(isinstance(self.remat, bool), "perf.remat", self.remat, "must be true or false.")
        _require(
            isinstance(self.compilation_cache, bool),
            "perf.compilation_cache",
            self.compilation_cache,
            "must be true or false.",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlowerConfig:
    """The Flower deployment (``ffa-jax flower``); ignored by the in-process simulation.

    Attributes:
      send_diagnostics: false (default): a client replies with its noised delta and public
        counts only. true: it also sends its training loss, mean gradient norm, clipped
        fraction and realised batch size, which epsilon does NOT cover (they are computed
        from its private data without noise); a client's node must also consent with
        ``--node-config "allow-non-private=true"``. Refused with client-level DP.
    """

    send_diagnostics: bool = False

    def __post_init__(self):
        _require(
            isinstance(self.send_diagnostics, bool),
            "flower.send_diagnostics",
            self.send_diagnostics,
            "must be true or false.",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Checkpoints of the whole run state in ``<output_dir>/<name>/checkpoints/`` (orbax).

    They never change results: ``ffa-jax train --resume RUN_DIR`` continues bit-identically.

    Attributes:
      every: save after every this many rounds (0 = only after the last round, which is
        always saved).
      keep: keep the newest this many checkpoints (older ones are deleted after a save).
    """

    every: int = 1
    keep: int = 2

    def __post_init__(self):
        _require(
            isinstance(self.every, int) and not isinstance(self.every, bool) and self.every >= 0,
            "checkpoint.every",
            self.every,
            "must be an integer >= 0 (rounds between saves; 0 = only at the end).",
        )
        _positive_int("checkpoint.keep", self.keep)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run. See ``configs/quickstart.yaml`` for an annotated example."""

    name: str = "quickstart"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    federated: FederatedConfig = dataclasses.field(default_factory=FederatedConfig)
    client: ClientConfig = dataclasses.field(default_factory=ClientConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    perf: PerfConfig = dataclasses.field(default_factory=PerfConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    flower: FlowerConfig = dataclasses.field(default_factory=FlowerConfig)

    @property
    def split_seed(self) -> int:
        """The seed of the train/test split: ``data.split_seed``, or ``seed`` when null."""
        return self.seed if self.data.split_seed is None else self.data.split_seed

    def __post_init__(self):
        _check_name_and_seed(self.name, self.seed, "run")
        _require(
            not (
                self.flower.send_diagnostics
                and self.privacy.enabled
                and self.privacy.unit == "client"
            ),
            "flower.send_diagnostics",
            self.flower.send_diagnostics,
            "is refused with privacy.unit=client: per-client diagnostics (loss, update norms) "
            "are exactly what client-level DP hides. Set it to false.",
        )
        if self.data.partition == "label_mix":
            rows = len(self.data.label_mix)
            _require(
                self.federated.clients % rows == 0,
                "federated.clients",
                self.federated.clients,
                f"with data.partition=label_mix it must be a multiple of the {rows} rows of "
                "data.label_mix (one label distribution per client).",
            )
        if self.privacy.enabled and self.privacy.unit == "client":
            _require(
                self.federated.weighting == "uniform",
                "federated.weighting",
                self.federated.weighting,
                "must be 'uniform' with privacy.unit=client: every client's clipped update "
                "counts once, or one client's weight would exceed the sensitivity S.",
            )
            _require(
                not (
                    self.federated.partial
                    and self.federated.client_sampling == "fixed"
                    and self.privacy.accountant == "pld"
                ),
                "privacy.accountant",
                self.privacy.accountant,
                "cannot account client-level DP with federated.client_sampling=fixed (sampling "
                "without replacement): dp-accounting's PLD accountant has no such event. Use "
                "privacy.accountant=rdp, or federated.client_sampling=poisson.",
            )
        if self.privacy.mechanism == "banded_mf":
            _check_banded_mf(self.privacy, self.federated)
        chunk = self.perf.clients_per_chunk
        if chunk != AUTO and chunk and self.perf.devices:
            _require(
                chunk % self.perf.devices == 0,
                "perf.devices",
                self.perf.devices,
                f"must divide perf.clients_per_chunk={chunk}.",
            )

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def _check_banded_mf(priv: PrivacyConfig, fed: FederatedConfig) -> None:
    """The cross-section checks of ``privacy.mechanism=banded_mf`` (before any compute)."""
    _require(
        priv.enabled,
        "privacy.mechanism",
        priv.mechanism,
        "banded_mf needs a private run (privacy.epsilon or privacy.noise_multiplier).",
    )
    if priv.unit == "sample":
        _check_sample_banded_mf(priv, fed)
        return
    _require(
        priv.bands <= fed.rounds,
        "privacy.bands",
        priv.bands,
        f"must be <= federated.rounds={fed.rounds} (the strategy matrix is rounds x rounds).",
    )
    _require(
        fed.client_sampling == "poisson",
        "federated.client_sampling",
        fed.client_sampling,
        "banded_mf needs poisson (cyclic Poisson) client sampling: its amplified accounting "
        "(jax-privacy's BandMF reduction) does not cover fixed-size sampling.",
    )
    _require(
        fed.participants * priv.bands <= fed.clients,
        "privacy.bands",
        priv.bands,
        f"banded_mf samples each round's clients from one of bands={priv.bands} fixed groups "
        f"of federated.clients // bands = {fed.clients // priv.bands} clients, so "
        f"federated.clients_per_round ({fed.participants}) x bands must be <= "
        f"federated.clients ({fed.clients}); lower bands or clients_per_round (bands=1 allows "
        "full participation).",
    )


def _check_sample_banded_mf(priv: PrivacyConfig, fed: FederatedConfig) -> None:
    """Sample-level BandMF: every client's noise stream spans all its ``rounds x
    local_steps`` steps, so that number must be known when the run starts (all clients
    every round), and the strategy matrix is that many steps square."""
    _require(
        not fed.partial,
        "federated.clients_per_round",
        fed.clients_per_round,
        "sample-level banded_mf (privacy.unit=sample) needs every client in every round "
        "(null, or = federated.clients): each client's correlated noise stream and its "
        "strategy matrix are sized for its total number of local steps (rounds x "
        "local_steps), which partial participation leaves random. Use "
        "federated.clients_per_round=null, or privacy.mechanism=gaussian.",
    )
    steps = fed.rounds * fed.local_steps
    _require(
        priv.bands <= steps,
        "privacy.bands",
        priv.bands,
        f"must be <= federated.rounds x federated.local_steps = {steps} (sample-level BandMF: "
        "the strategy matrix is each client's total local steps square).",
    )


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and converts YAML-ish spellings."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, field)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{field}={value!r} has the wrong type.")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{field}={value!r} must be a list.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{field}[{i}]") for i, v in enumerate(value))
        return tuple(
            _coerce(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{field}={value!r} must be true or false.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{field}={value!r} must be an integer.")
    if tp is float:
        if _is_number(value):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # accepts "inf", "1e-5"
            except ValueError:
                pass
        raise ConfigError(
            f"{field}={value!r} must be a number ('inf' allowed where it makes sense)."
        )
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{field}={value!r} must be a string.")
    raise ConfigError(f"{field}: unsupported type {tp!r}")  # pragma: no cover


def from_dict(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Builds the dataclass ``cls`` from nested plain data, rejecting unknown keys."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"unknown config key(s) {[prefix + u for u in unknown]} in {where}; "
            f"valid keys are {sorted(prefix + f for f in fields)}."
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{name} must be a mapping of its fields, got {value!r}.")
            kwargs[name] = from_dict(tp, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"lora.rank=16"`` -> ``(["lora", "rank"], 16)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(
            f"override {text!r} must look like section.field=value, e.g. lora.rank=16."
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; use section.field=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e}).") from e
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
        value = math.inf
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of the nested ``data`` with every ``section.field=value`` applied."""
    out = _deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {p} is not a section.")
            node = nxt
        node[path[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


# The configs shipped with ffa_jax: in a checkout a link to the repository's configs/, in a
# wheel its package data (pyproject.toml).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the shipped configs, as ``--config NAME`` takes them (``quickstart``,
    ``glue/sst2``: paths under :data:`SHIPPED_CONFIGS` without ``.yaml``)."""
    if not SHIPPED_CONFIGS.is_dir():
        return []
    return sorted(
        p.relative_to(SHIPPED_CONFIGS).with_suffix("").as_posix()
        for p in SHIPPED_CONFIGS.rglob("*.yaml")
    )


def config_path(path: str | Path) -> Path:
    """The YAML file ``path`` names: the file itself if it exists, else the shipped config of
    that name (``quickstart``, ``quickstart.yaml``, ``configs/glue/sst2.yaml`` and
    ``glue/sst2`` all resolve, from any working directory); ``path`` unchanged if neither
    exists."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.as_posix().removeprefix("configs/").removesuffix(".yaml")
    shipped = SHIPPED_CONFIGS / f"{name}.yaml"
    return shipped if shipped.is_file() else p


def _read_sections(path: str | Path | None, *, example: str) -> dict[str, Any]:
    """The YAML mapping of config sections in ``path`` (``{}`` for None or an empty file), a
    file or the name of a shipped config (:func:`config_path`).

    Raises:
      ConfigError: the file is missing, not valid YAML, or not a mapping.
    """
    if path is None:
        return {}
    p = config_path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} does not exist; pass --config with a YAML file such as "
            f"{example}, or the name of a shipped config: {', '.join(shipped_configs())}."
        )
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {str(p)!r} must hold a mapping of sections, got {type(loaded).__name__}."
        )
    return loaded


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Loads a YAML config (or the defaults when ``path`` is None) and applies overrides.

    Raises:
      ConfigError: the file is missing or not a mapping, a key is unknown, or a value is
        invalid (the message names the field and the fix).
    """
    data = _read_sections(path, example="configs/quickstart.yaml")
    return from_dict(RunConfig, apply_overrides(data, overrides))


def replace(cfg: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """A new config with ``section.field=value`` overrides applied (validated)."""
    return from_dict(RunConfig, apply_overrides(cfg.to_dict(), overrides))


# ---------------------------------------------------------------------------------------------
# Central (non-private) pretraining of a small ViT: ``ffa-jax pretrain``


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTArchConfig:
    """Architecture of a ViT trained from scratch (HF ``ViTConfig`` field meanings).

    Attributes:
      image_size: input side in pixels; patch_size must divide it.
      patch_size: patch side in pixels.
      num_channels: 1 (grayscale) or 3 (RGB).
      hidden_size, num_layers, num_heads, intermediate_size: transformer width, depth, heads
        (must divide hidden_size) and MLP width.
    """

    image_size: int = 28
    patch_size: int = 7
    num_channels: int = 1
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _positive_int(f"model.{f.name}", getattr(self, f.name))
        _require(
            self.image_size % self.patch_size == 0,
            "model.patch_size",
            self.patch_size,
            f"must divide model.image_size={self.image_size}.",
        )
        _require(
            self.hidden_size % self.num_heads == 0,
            "model.num_heads",
            self.num_heads,
            f"must divide model.hidden_size={self.hidden_size}.",
        )
        _require(
            self.num_channels in (1, 3), "model.num_channels", self.num_channels, "use 1 or 3."
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainDataConfig:
    """The public pretraining task (see :mod:`ffa_jax.data.images` for ``task``).

    Attributes:
      task: ``mnist5k``, a local ``.npz`` file or folder, or a HF image dataset name.
      classes: source label ids to keep, relabelled ``0..k-1`` (null: all).
      test_fraction: held-out share for the reported accuracy (when the source has no test
        split).
      max_train_examples: optional cap (stratified).
      image_field, label_field: columns of folders and HF datasets.
      cache_dir: resized-image cache (``auto``, a folder, or null for none).
    """

    task: str = "mnist5k"
    classes: tuple[int, ...] | None = (0, 1, 2, 3, 4)
    test_fraction: float = 0.2
    validation_fraction: float = 0.0
    max_train_examples: int | None = None
    image_field: str = "image"
    label_field: str = "label"
    cache_dir: str | None = "auto"

    def __post_init__(self):
        _require(
            _is_number(self.test_fraction) and 0 < self.test_fraction < 1,
            "data.test_fraction",
            self.test_fraction,
            "must be in (0, 1), e.g. 0.2.",
        )
        _require(
            _is_number(self.validation_fraction) and 0 <= self.validation_fraction < 0.5,
            "data.validation_fraction",
            self.validation_fraction,
            "must be in [0, 0.5): 0 for no validation split, e.g. 0.1 for 10% of each client.",
        )
        if self.max_train_examples is not None:
            _positive_int("data.max_train_examples", self.max_train_examples)
        if self.classes is not None:
            _require(
                len(self.classes) >= 2
                and len(set(self.classes)) == len(self.classes)
                and all(c >= 0 for c in self.classes),
                "data.classes",
                list(self.classes),
                "give at least two distinct label ids >= 0, or null for all labels.",
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainOptimConfig:
    """Central training: AdamW with linear warmup and cosine decay, fixed-size shuffled batches.

    Attributes:
      learning_rate: peak learning rate.
      weight_decay: AdamW decoupled weight decay (not applied to biases/LayerNorm/embeddings).
      batch_size: examples per step (the last partial batch of an epoch is dropped).
      epochs: passes over the training split.
      warmup_steps: linear warmup steps.
      augment_shift: random translations of up to this many pixels per axis (0 = none).
    """

    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    epochs: int = 30
    warmup_steps: int = 100
    augment_shift: int = 2

    def __post_init__(self):
        _require(
            _is_number(self.learning_rate) and self.learning_rate > 0,
            "optim.learning_rate",
            self.learning_rate,
            "must be > 0.",
        )
        _require(
            _is_number(self.weight_decay) and self.weight_decay >= 0,
            "optim.weight_decay",
            self.weight_decay,
            "must be >= 0.",
        )
        _positive_int("optim.batch_size", self.batch_size)
        _positive_int("optim.epochs", self.epochs)
        for f in ("warmup_steps", "augment_shift"):
            v = getattr(self, f)
            _require(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                f"optim.{f}",
                v,
                "must be an integer >= 0.",
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """``ffa-jax pretrain``: see ``configs/vision_pretrain_mnist.yaml``. The model is written to
    ``<output_dir>/<name>/`` (HF safetensors + config.json + preprocessor_config.json)."""

    name: str = "vit_mnist_pretrain"
    seed: int = 0
    output_dir: str = "runs"
    model: ViTArchConfig = dataclasses.field(default_factory=ViTArchConfig)
    data: PretrainDataConfig = dataclasses.field(default_factory=PretrainDataConfig)
    optim: PretrainOptimConfig = dataclasses.field(default_factory=PretrainOptimConfig)

    def __post_init__(self):
        _check_name_and_seed(self.name, self.seed, "output")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_pretrain_config(
    path: str | Path | None = None, overrides: Sequence[str] = ()
) -> PretrainConfig:
    """Loads a pretraining YAML config (or the defaults) and applies ``section.field=value``
    overrides. Raises ConfigError as :func:`load_config`."""
    data = _read_sections(path, example="configs/vision_pretrain_mnist.yaml")
    return from_dict(PretrainConfig, apply_overrides(data, overrides))
