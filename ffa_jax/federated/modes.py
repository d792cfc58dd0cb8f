"""The federated LoRA variants as modes of one machinery (``lora.mode``).

A mode is a frozen :class:`ModeSpec`: which LoRA factors the server's trainable tree holds
(:data:`ffa_jax.lora.TRAINED_FACTORS`), which of them the clients train and send in round
``t`` (:meth:`ModeSpec.sent`), and its privacy statement. The round itself is the same jitted
:func:`ffa_jax.federated.round.make_round` for every mode: :func:`mode_round` only restricts
the client update to the round's factors (the others are passed as frozen) and keeps the
factors nobody trained bit-identical.

Modes (``W = W0 + s * B A`` in the papers' layout; here ``w0 + s * a @ b`` with
``a`` ``[d_in, r]``, ``b`` ``[r, d_out]``):

* ``ffa`` (FFA-LoRA, Sun et al. 2024): ``a`` frozen (shared seed), ``b`` trained and sent.
* ``lora``: ``a`` and ``b`` trained and sent, averaged separately.
* ``fedsa`` (FedSA-LoRA, Guo et al. 2025, "Selective Aggregation for Low-Rank Adaptation in
  Federated Learning"): clients train ``a`` and ``b``; only ``a`` is sent and averaged,
  each client keeps its own ``b`` across rounds (``ServerState.extra["client_b"]``, leaves
  ``[N clients, r, d_out]``: in a simulation the server holds it for the clients, and
  checkpoints it; no server computation reads it). The global model evaluated is the mean of
  the personalised models, ``w0 + s * a @ mean_k(b_k)`` (exact: ``a`` is shared), and each
  personalised model is evaluated too (``eval_clients``).
* ``rolora`` (RoLoRA, Chen et al. 2024, "Robust Federated Finetuning of LLMs via Alternating
  Optimization of LoRA"): even rounds (0, 2, ...) train and send ``b`` with ``a`` fixed, odd
  rounds train and send ``a`` with ``b`` fixed. Averaging one factor while the other is the
  same on every client is exact: ``mean_k(a) @ b_k`` has no cross terms.
* ``fedsb`` (Fed-SB, Singhal et al. 2025, "Fed-SB: A Silver Bullet for Extreme Communication
  Efficiency and Performance in (Private) Federated LoRA Fine-Tuning"): ``a`` and ``b``
  frozen (from the pretrained kernel's SVD or a public random draw, see
  :func:`ffa_jax.lora.fedsb_node`), only the ``r x r`` matrix ``mid`` between them trained and
  sent: ``w0 + s * a @ mid @ b``. The update is linear in ``mid``, so averaging is exact.

Modes with a server step after the aggregation (:data:`SERVER_RULES`; the step is a pure,
jitted function of the round's releases and the server's state, its extra state in
``ServerState.extra`` and so in every checkpoint):

* ``fedex`` (FedEx-LoRA, Singhal et al. 2025, "Exact Aggregation for Federated and Efficient
  Fine-Tuning of Foundation Models"): clients train ``a`` and ``b``; the server averages
  them and folds the residual ``s * (mean_k(a_k @ b_k) - mean(a) @ mean(b))`` into the
  frozen base weight (``extra["w0_delta"]``), so the effective weight is exactly the mean
  of the clients' effective weights (:func:`fedex_step`).
* ``flora`` (FLoRA, Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models
  with Heterogeneous Low-Rank Adaptations"): clients train ``a`` and ``b`` from a fresh
  start; the server stacks the clients' factors (``A_stack = [a_1 .. a_K]``,
  ``B_stack = [w_1 b_1; ..; w_K b_K]``), merges ``s * A_stack @ B_stack = s * sum_k w_k a_k
  @ b_k`` into the base weight and re-initialises ``a`` (a new public draw) and ``b = 0``
  (:func:`flora_step`).
* ``fedsvd`` (FedSVD, "FedSVD: Adaptive Orthogonalization for Private Federated Learning
  with LoRA", 2025): clients train ``b`` with ``a`` fixed (as FFA-LoRA); after averaging the
  server re-factorises ``a @ b`` by SVD so that ``a`` has orthonormal columns (the paper's
  orthonormal rows of A in PyTorch layout) and broadcasts the new ``a`` and ``b``
  (:func:`fedsvd_step`, ``extra["a"]``).

A classification head matched by the workload's head pattern is trained and sent in every
round by every mode (it is a plain leaf, averaged like FedAvg).

Heterogeneous client ranks (``lora.client_ranks``, FLoRA only, :func:`ranked_client_update`):
client k computes ``a @ diag(m_k) @ b`` (``m_k``: ``r_k`` ones, then zeros, in the Fed-SB
``mid`` slot of its frozen tree) and masks its upload, so the padded components neither
train nor leave it; the stack is then exactly ``sum_k w_k a_k[:, :r_k] @ b_k[:r_k]``.

Privacy (every mode here): the formal guarantee follows from what leaves a client, and in
these modes that is exactly the delta of the round's sent leaves. Under sample-level DP each
local step is DP-SGD on the sent leaves only (clipped jointly over them, noised), so the
upload is the sampled Gaussian mechanism's post-processing, as for FFA-LoRA; the factors a
client holds but does not send are either public (frozen, from the public seed or the public
pretrained weights) or the server's previous releases. Under client-level DP the whole upload
(the sent leaves; the unsent ones enter the round as zeros and add nothing to its norm) is
clipped to ``privacy.client_clip_norm`` and the server noises the sum (DP-FedAvg); noise the
server draws for the unsent factors is discarded, which is post-processing. The accountant
is therefore the one of FFA-LoRA for every mode, with no change.

FedSA-LoRA: a client's ``b`` never leaves it. Under sample-level DP every local step is
DP-SGD on (``a``, ``b``, head) jointly, so the uploaded ``a`` and the kept ``b`` are both
post-processing of DP releases (and so are the personalised models' evaluations). Under
client-level DP the uploaded ``a`` would be covered, but the model the run evaluates and
exports (the personalised models and their mean) is built from the un-noised ``b_k``, which
the guarantee does not cover: FedSA-LoRA with ``privacy.unit: client`` is refused.

The server steps are post-processing of what the clients released: FedSVD's SVD of the
noised mean ``b`` times the public ``a`` is post-processing under either unit. FedEx's
residual and FLoRA's stacked sum need each client's own factors ``a_k``, ``b_k``: under
sample-level DP each upload is already a DP release (DP-SGD inside the client), so products
of the noised ``a_k``, ``b_k`` are post-processing; under client-level DP the individual
uploads are not noised (only their clipped sum is), so those products are not covered by
the guarantee and the two modes are refused with ``privacy.unit: client``
(:func:`check_config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from ffa_jax import lora
from ffa_jax.config import LORA_MODES, RunConfig
from ffa_jax.errors import ConfigError
from ffa_jax.federated.server import ServerState
from ffa_jax.types import PyTree


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModeSpec:
    """One ``lora.mode``.

    Attributes:
      name: the ``lora.mode`` value.
      title: display name (tables, reports).
      schedule: the LoRA factors clients train and send, one tuple per round of a cycle:
        round ``t`` uses ``schedule[t % len(schedule)]`` (a subset of the server tree's
        :data:`ffa_jax.lora.TRAINED_FACTORS`).
      peft: whether the trained model is a PEFT LoRA adapter (``W0 + s B A``) as it stands
        (Fed-SB's ``mid`` is folded into ``b`` at export, :func:`ffa_jax.lora.fold_mid`).
      init_from: whether ``lora.init_from`` (a PEFT adapter's A and B) can start this mode.
      server_rule: the server step after aggregation (a key of :data:`SERVER_RULES`), or
        None (plain FedAvg / the server optimiser).
      client_products: the server step reads each client's own upload (FedEx's residual,
        FLoRA's stack), not only their (noised) sum: refused under client-level DP.
      client_state: the factor each client trains and keeps to itself across rounds (never
        sent; FedSA-LoRA's ``"b"``), or None.
      client_ranks: heterogeneous client ranks (``lora.client_ranks``) are supported.
    """

    name: str
    title: str
    schedule: tuple[tuple[str, ...], ...]
    peft: bool = True
    init_from: bool = True
    server_rule: str | None = None
    client_products: bool = False
    client_state: str | None = None
    client_ranks: bool = False

    def sent(self, round_idx: int) -> tuple[str, ...]:
        """The factors trained and sent in round ``round_idx`` (0-based)."""
        return self.schedule[int(round_idx) % len(self.schedule)]

    @property
    def alternating(self) -> bool:
        return len(self.schedule) > 1


SPECS: dict[str, ModeSpec] = {
    "ffa": ModeSpec(name="ffa", title="FFA-LoRA", schedule=(("b",),)),
    "lora": ModeSpec(name="lora", title="LoRA", schedule=(("a", "b"),)),
    "fedsa": ModeSpec(
        name="fedsa", title="FedSA-LoRA", schedule=(("a",),), client_state="b", init_from=False
    ),
    "rolora": ModeSpec(name="rolora", title="RoLoRA", schedule=(("b",), ("a",))),
    "fedsb": ModeSpec(name="fedsb", title="Fed-SB", schedule=(("mid",),), init_from=False),
    "fedex": ModeSpec(
        name="fedex",
        title="FedEx-LoRA",
        schedule=(("a", "b"),),
        peft=False,
        server_rule="fedex",
        client_products=True,
    ),
    "fedsvd": ModeSpec(name="fedsvd", title="FedSVD", schedule=(("b",),), server_rule="fedsvd"),
    "flora": ModeSpec(
        name="flora",
        title="FLoRA",
        schedule=(("a", "b"),),
        peft=False,
        server_rule="flora",
        client_products=True,
        client_ranks=True,
    ),
}
assert tuple(SPECS) == LORA_MODES, "every lora.mode needs a ModeSpec"


def spec(mode: str) -> ModeSpec:
    """The :class:`ModeSpec` of ``lora.mode``.

    Raises:
      ConfigError: unknown mode (names the field and the choices).
    """
    if mode not in SPECS:
        raise ConfigError(f"lora.mode={mode!r} is not one of {tuple(SPECS)}.")
    return SPECS[mode]


def check_config(cfg: RunConfig) -> None:
    """Refuses, before any compute, the combinations a mode does not support, by name.

    Raises:
      ConfigError: ``lora.init_from`` with a mode whose factors a PEFT adapter cannot give
        (Fed-SB's ``mid``).
    """
    s = spec(cfg.lora.mode)
    private_clients = cfg.privacy.enabled and cfg.privacy.unit == "client"
    if s.client_products and private_clients:
        raise ConfigError(
            f"lora.mode={s.name!r} with privacy.unit='client' is refused: the {s.title} server "
            "step multiplies each client's own uploaded A and B, but under client-level DP "
            "only their clipped sum is noised, so those products are not covered by the "
            "guarantee. Use privacy.unit: sample (each upload is then a DP release), or "
            "lora.mode: fedsvd / fedsb / rolora / ffa with client-level DP."
        )
    if s.client_state is not None and private_clients:
        raise ConfigError(
            f"lora.mode={s.name!r} with privacy.unit='client' is refused: each client keeps its "
            f"own B, which client-level DP does not noise, and the run evaluates and exports "
            "the personalised models (and their mean) built from those B, so its outputs "
            "would not be covered by the guarantee. Use privacy.unit: sample (every local "
            "step is then DP-SGD on A and B), or lora.mode: ffa / fedsvd / fedsb / rolora."
        )
    if (
        cfg.privacy.enabled
        and cfg.privacy.mechanism == "banded_mf"
        and (s.alternating or s.server_rule is not None or s.client_state is not None)
    ):
        raise ConfigError(
            f"privacy.mechanism='banded_mf' with lora.mode={s.name!r} is refused: correlated "
            "noise cancels across rounds only when every round adds it to the same parameters, "
            f"and {s.title} changes which factors are sent or replaces them on the server, so "
            "part of the noise stream would be dropped and the guarantee would not be the "
            "accounted one. Use privacy.mechanism: gaussian, or lora.mode: ffa / lora / fedsb."
        )
    ranks = cfg.lora.client_ranks
    if ranks is not None and not s.client_ranks:
        allowed = [m.name for m in SPECS.values() if m.client_ranks]
        raise ConfigError(
            f"lora.client_ranks={ranks!r} with lora.mode={s.name!r} is refused: {s.title} "
            "averages the factors themselves (or a factor shared by all clients), which "
            "zero-padded factors of different ranks would bias; heterogeneous ranks need a "
            f"server rule that aggregates the products exactly: lora.mode one of {allowed}, "
            "or lora.client_ranks: null."
        )
    if ranks is not None and len(ranks) != cfg.federated.clients:
        raise ConfigError(
            f"lora.client_ranks has {len(ranks)} entries but federated.clients="
            f"{cfg.federated.clients}: give one rank per client."
        )
    if s.server_rule is not None and cfg.server.optimizer != "sgd":
        raise ConfigError(
            f"server.optimizer={cfg.server.optimizer!r} with lora.mode={s.name!r} is refused: "
            f"the {s.title} server step replaces the factors after the update, so a stateful "
            "server optimiser's moments would refer to factors that no longer exist. Use "
            "server.optimizer: sgd."
        )
    if s.client_products and (cfg.server.learning_rate != 1.0 or cfg.server.schedule != "constant"):
        raise ConfigError(
            f"server.learning_rate={cfg.server.learning_rate!r} (schedule "
            f"{cfg.server.schedule!r}) with lora.mode={s.name!r} is refused: {s.title}'s "
            "aggregation is exact for the clients' mean (FedAvg, server.learning_rate: 1, "
            "constant) only. Set server.learning_rate: 1 and server.schedule: constant."
        )
    if s.server_rule is not None and cfg.perf.model_devices != 1:
        raise ConfigError(
            f"perf.model_devices={cfg.perf.model_devices!r} with lora.mode={s.name!r} is not "
            "supported: the server step keeps per-target state next to the frozen weights, "
            "which is implemented for unsharded frozen trees only. Set perf.model_devices: 1."
        )
    if cfg.lora.init_from is not None and not s.init_from:
        why = (
            "trains an r x r matrix between frozen factors of its own init (lora.sb_init)"
            if s.name == "fedsb"
            else "keeps a B per client, which one adapter's B does not give"
        )
        raise ConfigError(
            f"lora.init_from={cfg.lora.init_from!r} cannot start lora.mode={s.name!r}: a PEFT "
            f"adapter holds one A and B, but {s.title} {why}. Set lora.init_from: null, or "
            "use lora.mode: ffa or lora."
        )


def no_adapter_note(mode: str) -> str:
    """Why a run of ``mode`` writes no PEFT adapter (``ModeSpec.peft`` False)."""
    s = spec(mode)
    return (
        f"lora.mode={s.name!r}: {s.title} folds the clients' updates into the base weights "
        "(a full-rank d_in x d_out delta per target, in the checkpoint's server state), which "
        "a PEFT LoRA adapter (W0 + s B A) cannot represent: no adapter.safetensors is written "
        "and export-peft/generate/predict/eval refuse the run. Evaluate it during training "
        "(eval.every)."
    )


def round_mask(mode: str, trainable: PyTree, round_idx: int) -> PyTree:
    """Bool tree over the server's ``trainable`` tree: True for the leaves clients train and
    send in round ``round_idx`` (the mode's factors of that round, and every plain leaf, i.e.
    the head). Use with :func:`ffa_jax.lora.split`."""
    return lora.factor_mask(trainable, spec(mode).sent(round_idx), plain=True)


def sent_tree(mode: str, trainable: PyTree, round_idx: int) -> PyTree:
    """The part of ``trainable`` (or of a delta shaped like it) sent in round ``round_idx``."""
    return lora.split(trainable, round_mask(mode, trainable, round_idx))[0]


def uplink_bytes(mode: str, trainable: PyTree, round_idx: int, rank: int | None = None) -> int:
    """Bytes one client uploads in round ``round_idx``: its delta of the round's sent leaves
    (float32 factors and head). Analytic count per LoRA target ``[d_in, d_out]`` of rank r:
    ffa ``4 r d_out``; lora ``4 r (d_in + d_out)``; rolora ``4 r d_out`` (even rounds) /
    ``4 r d_in`` (odd); fedsb ``4 r^2``; plus the head's bytes. ``rank``: the client's own
    rank under ``lora.client_ranks`` (its factors' first ``rank`` components only)."""
    sent = sent_tree(mode, trainable, round_idx)
    total = lora.tree_bytes(sent)
    if rank is None:
        return total
    for n in _nodes(sent):
        for f in ("a", "b"):
            x = getattr(n, f)
            if x is not None:
                total -= 4 * (n.b.shape[0] - rank) * (x.size // n.b.shape[0])
    return total


def mean_uplink_bytes(mode: str, trainable: PyTree) -> int | float:
    """:func:`uplink_bytes` averaged over one cycle of the mode's schedule (the per-round
    upload of a mode that sends the same leaves every round)."""
    cycle = len(spec(mode).schedule)
    total = sum(uplink_bytes(mode, trainable, t) for t in range(cycle))
    return total // cycle if total % cycle == 0 else total / cycle


def downlink_bytes(
    mode: str,
    params: PyTree,
    trainable: PyTree,
    round_idx: int,
    participants: int = 1,
    participant_ranks: Sequence[int] | None = None,
) -> int:
    """Bytes the server sends each participant after round ``round_idx``. ``params``: the
    full tree (factor shapes), ``trainable``: the server's trainable tree, ``participants``:
    how many took part (FLoRA's stack grows with it); ``participant_ranks``: their ranks
    under ``lora.client_ranks`` (FLoRA's stack has ``sum_k r_k`` components). Analytic count
    per LoRA target
    ``[d_in, d_out]`` of rank r, on top of the head's bytes:

    * ffa / lora / rolora / fedsb: the leaves the aggregate changed, i.e. the sent ones (the
      others are bit-identical): as :func:`uplink_bytes`.
    * fedex: the averaged ``a`` and ``b`` plus the residual, ``4 (r (d_in + d_out) + d_in
      d_out)``.
    * fedsvd: the re-factorised ``a`` and ``b``, ``4 r (d_in + d_out)``.
    * flora: the stacked factors of all participants, ``4 P r (d_in + d_out)`` (the fresh
      ``a`` comes from the public seed and ``b = 0``: not sent).
    """
    s = spec(mode)
    sent = uplink_bytes(mode, trainable, round_idx)
    if s.server_rule is None:
        return sent
    sent_factors = sum(
        lora.tree_bytes(getattr(n, f)) for n in _nodes(trainable) for f in s.sent(round_idx)
    )
    total = sent - sent_factors  # the head
    for n in lora.lora_nodes(params).values():
        d_in, r = n.a.shape
        d_out = n.b.shape[1]
        per_client = 4 * r * (d_in + d_out)
        if s.server_rule == "fedex":
            total += per_client + 4 * d_in * d_out
        elif s.server_rule == "flora":
            stacked = participants * r if participant_ranks is None else sum(participant_ranks)
            total += 4 * stacked * (d_in + d_out)
        else:  # fedsvd
            total += per_client
    return total


def _nodes(tree: PyTree) -> list:
    return list(lora.lora_nodes(tree).values())


def restrict_client_update(client_update: Callable, mask: PyTree) -> Callable:
    """``client_update`` (of :func:`ffa_jax.federated.client.make_client_update`) training only
    the leaves where ``mask`` (over the server's trainable tree) is True.

    The others are passed to the client as part of its frozen tree (no gradient, no
    clipping, no noise) and its returned delta is zero there, so the round's aggregation and
    server step see a tree of the usual structure. Signature unchanged."""

    def restricted(trainable, frozen, *args):
        sent, held = lora.split(trainable, mask)
        delta, metrics = client_update(sent, lora.combine(held, frozen), *args)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, held)
        return lora.combine(delta, zeros), metrics

    return restricted


def keep_unsent(new: PyTree, old: PyTree, mask: PyTree) -> PyTree:
    """``new`` where ``mask`` is True, ``old`` elsewhere: the factors nobody trained in the
    round stay bit-identical whatever the server optimiser or the client-level noise did to
    their zero update."""
    return lora.combine(lora.split(new, mask)[0], lora.split(old, mask)[1])


def init_state(
    mode: str, state: ServerState, params: PyTree, num_clients: int | None = None
) -> ServerState:
    """``state`` (from :func:`~ffa_jax.federated.server.server_init`) with the mode's extra
    server state (``state.extra``): ``{"w0_delta": {target path: zeros [d_in, d_out]}}`` (fedex,
    flora: what the server has folded into each base weight, float32) or ``{"a": {target
    path: a [d_in, r]}}`` (fedsvd: the current, re-factorised ``a``) or ``{"client_b": {target
    path: [num_clients, r, d_out]}}`` (fedsa: each client's own ``b``, :func:`client_b`);
    unchanged for the other modes. ``params``: the run's full starting tree;
    ``num_clients``: ``federated.clients``."""
    s = spec(mode)
    rule = s.server_rule
    nodes = lora.lora_nodes(params)
    if s.client_state == "b":
        if num_clients is None:
            raise ValueError(f"lora.mode={mode!r} keeps per-client state: pass num_clients.")
        extra = {"client_b": client_b(params, num_clients)}
    elif rule in ("fedex", "flora"):
        extra = {"w0_delta": {p: jnp.zeros(n.w0.shape, jnp.float32) for p, n in nodes.items()}}
    elif rule == "fedsvd":
        extra = {"a": {p: jnp.asarray(n.a, jnp.float32) for p, n in nodes.items()}}
    else:
        return state
    return state._replace(extra=extra)


def client_b(params: PyTree, num_clients: int) -> dict[str, jax.Array]:
    """FedSA-LoRA's initial per-client B: ``{target path: [num_clients, r, d_out]}``, every
    client starting from the run's initial ``b`` (zero unless ``lora.init_from``)."""
    return {
        p: jnp.broadcast_to(jnp.asarray(n.b, jnp.float32), (num_clients, *n.b.shape))
        for p, n in lora.lora_nodes(params).items()
    }


def fedsa_client_update(client_update: Callable) -> Callable:
    """FedSA-LoRA's client: ``client_update`` (of :func:`ffa_jax.federated.client.
    make_client_update`) run on (the server's ``a`` and head, this client's own ``b``),
    returning ``(upload, metrics, new b)``: the upload is the delta of ``a`` and the head
    only (the server tree's structure); the new ``b`` (``{path: [r, d_out]}``) stays with the
    client (``RoundInputs.client_state`` of the round). Signature: ``(trainable, frozen,
    batches, dp, key, extra_grad_sums, own_b)``."""

    def update(trainable, frozen, batches, dp, key, extra_grad_sums, own_b):
        def with_b(path, x):
            return x.replace(b=own_b[lora.path_str(path)]) if lora.is_lora(x) else x

        def without_b(x):
            return x.replace(b=None) if lora.is_lora(x) else x

        mine = jax.tree_util.tree_map_with_path(with_b, trainable, is_leaf=lora.is_lora)
        rest = jax.tree_util.tree_map(without_b, frozen, is_leaf=lora.is_lora)
        delta, metrics = client_update(mine, rest, batches, dp, key, extra_grad_sums)
        new_b = {p: own_b[p] + n.b for p, n in lora.lora_nodes(delta).items()}
        upload = jax.tree_util.tree_map(without_b, delta, is_leaf=lora.is_lora)
        return upload, metrics, new_b

    return update


def rank_masks(client_ranks, rank: int, client_ids) -> jax.Array:
    """``[P, rank]`` float32 masks: 1 on the first ``client_ranks[id]`` rank components of each
    slot's client (dummy slots, ids >= N: all ones, unused)."""
    table = jnp.asarray(client_ranks, jnp.int32)
    ids = jnp.asarray(client_ids)
    r = jnp.where(ids < table.shape[0], table[jnp.minimum(ids, table.shape[0] - 1)], rank)
    return (jnp.arange(rank)[None, :] < r[:, None]).astype(jnp.float32)


def ranked_client_update(client_update: Callable) -> Callable:
    """A client of rank ``r_k <= r``: ``client_update`` run with the diagonal mask
    ``diag(m_k)`` (``m_k``: ``r_k`` ones, then zeros) between its factors, as Fed-SB's ``mid``
    in the frozen tree, so the forward is ``a @ diag(m_k) @ b`` (a rank-``r_k`` adapter, zero
    gradient on the padded components); the upload is masked (``a`` columns, ``b`` rows), so
    the padding (which DP noise may have touched) never leaves the client. Signature:
    ``(trainable, frozen, batches, dp, key, extra_grad_sums, mask [r]) -> (upload, metrics,
    mask)``."""

    def update(trainable, frozen, batches, dp, key, extra_grad_sums, mask):
        diag = jnp.diag(mask)

        def with_mid(x):
            return x.replace(mid=diag) if lora.is_lora(x) else x

        def masked(x):
            return x.replace(a=x.a * mask, b=x.b * mask[:, None]) if lora.is_lora(x) else x

        frozen_k = jax.tree_util.tree_map(with_mid, frozen, is_leaf=lora.is_lora)
        delta, metrics = client_update(trainable, frozen_k, batches, dp, key, extra_grad_sums)
        return jax.tree_util.tree_map(masked, delta, is_leaf=lora.is_lora), metrics, mask

    return update


def client_frozen(frozen: PyTree, extra: PyTree) -> PyTree:
    """The frozen tree the clients compute with: ``frozen`` with the server's extra state
    applied (``w0 + w0_delta``, in ``w0``'s dtype; FedSVD's current ``a``). ``extra`` None:
    ``frozen`` itself."""
    if extra is None:
        return frozen

    def one(path, x):
        if not lora.is_lora(x):
            return x
        p = lora.path_str(path)
        if "w0_delta" in extra:
            x = x.replace(w0=(x.w0 + extra["w0_delta"][p]).astype(x.w0.dtype))
        if "a" in extra:
            x = x.replace(a=extra["a"][p])
        if "client_b" in extra:
            # FedSA-LoRA: the personalised models' mean (exact, a is shared).
            x = x.replace(b=jnp.mean(extra["client_b"][p], axis=0))
        return x

    return jax.tree_util.tree_map_with_path(one, frozen, is_leaf=lora.is_lora)


def personal_params(state: ServerState, frozen: PyTree, client: int) -> PyTree:
    """FedSA-LoRA: client ``client``'s personalised model (the shared ``a``, its own ``b``)."""
    own = {p: x[client][None] for p, x in state.extra["client_b"].items()}
    return model_params(state._replace(extra={"client_b": own}), frozen)


def model_params(state: ServerState, frozen: PyTree) -> PyTree:
    """The global model of ``state``: its trainable tree joined with the frozen tree as the
    clients see it (:func:`client_frozen`). For evaluation and export."""
    return lora.combine(state.trainable, client_frozen(frozen, state.extra))


def _client_weights(weights: jax.Array) -> jax.Array:
    """``[K]`` normalised aggregation weights (0 for dummies), as in ``weighted_mean``."""
    w = jnp.where(weights > 0, weights, 0.0).astype(jnp.float32)
    return w / jnp.maximum(jnp.sum(w), 1e-12)


def _client_factors(old: lora.LoRAWeight, delta: lora.LoRAWeight, w: jax.Array):
    """Each client's ``a_k`` ``[K, d_in, r]`` and ``b_k`` ``[K, r, d_out]`` (server's factors
    plus its upload), zero for dummy clients (``w == 0``) so that they add nothing."""
    live = (w > 0)[:, None, None]
    a_k = jnp.where(live, old.a[None] + delta.a, 0.0)
    b_k = jnp.where(live, old.b[None] + delta.b, 0.0)
    return a_k, b_k


HIGHEST = jax.lax.Precision.HIGHEST


def fedex_step(old_trainable, new_trainable, deltas, weights, extra):
    """FedEx-LoRA's exact aggregation (pure). ``old_trainable``: the server's tree before the
    round; ``new_trainable``: after averaging (FedAvg: the clients' mean ``a`` and ``b``);
    ``deltas``: the clients' uploads, leaves ``[K, ...]``; ``weights`` ``[K]``; ``extra``:
    ``{"w0_delta": ...}``. Returns ``(new_trainable, extra)`` with, per target,
    ``w0_delta += s * (sum_k w_k a_k @ b_k - mean(a) @ mean(b))``: the effective weight
    ``w0 + w0_delta + s mean(a) @ mean(b)`` equals ``sum_k w_k (w0 + w0_delta_old + s a_k @
    b_k)`` (float32 rounding aside)."""
    w = _client_weights(weights)
    olds, news, ds = (lora.lora_nodes(t) for t in (old_trainable, new_trainable, deltas))
    w0_delta = {}
    for p, n in news.items():
        a_k, b_k = _client_factors(olds[p], ds[p], w)
        mean_prod = jnp.einsum("k,kir,kro->io", w, a_k, b_k, precision=HIGHEST)
        residual = mean_prod - jnp.matmul(n.a, n.b, precision=HIGHEST)
        w0_delta[p] = extra["w0_delta"][p] + n.scale * residual
    return new_trainable, {"w0_delta": w0_delta}


def flora_stack(a_k: jax.Array, b_k: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FLoRA's stacking: ``A_stack = [a_1 .. a_K]`` ``[d_in, K r]`` and ``B_stack = [w_1 b_1;
    ..; w_K b_K]`` ``[K r, d_out]``, so ``A_stack @ B_stack = sum_k w_k a_k @ b_k`` (the
    clients' ranks may differ: a client of rank ``r_k < r`` has zero columns / rows there)."""
    k, d_in, r = a_k.shape
    a_stack = jnp.moveaxis(a_k, 0, 1).reshape(d_in, k * r)
    b_stack = (w[:, None, None] * b_k).reshape(k * r, b_k.shape[-1])
    return a_stack, b_stack


def flora_step(old_trainable, new_trainable, deltas, weights, extra, fresh_key, a_init):
    """FLoRA's server step (pure): per target ``w0_delta += s * A_stack @ B_stack``
    (:func:`flora_stack`), then ``a`` re-drawn from ``fresh_key`` (public: the shared LoRA key
    folded with the number of rounds done) and ``b = 0``. Plain leaves (a head) keep their
    FedAvg value. Returns ``(new_trainable, extra)``."""
    w = _client_weights(weights)
    olds, ds = lora.lora_nodes(old_trainable), lora.lora_nodes(deltas)
    w0_delta = {}

    def one(path, x):
        if not lora.is_lora(x):
            return x
        p = lora.path_str(path)
        a_k, b_k = _client_factors(olds[p], ds[p], w)
        a_stack, b_stack = flora_stack(a_k, b_k, w)
        merged = jnp.matmul(a_stack, b_stack, precision=HIGHEST)
        w0_delta[p] = extra["w0_delta"][p] + x.scale * merged
        d_in, r = x.a.shape
        return x.replace(a=lora.draw_a(fresh_key, p, d_in, r, a_init), b=jnp.zeros_like(x.b))

    trainable = jax.tree_util.tree_map_with_path(one, new_trainable, is_leaf=lora.is_lora)
    return trainable, {"w0_delta": w0_delta}


def fedsvd_step(new_trainable, extra):
    """FedSVD's re-factorisation (pure): per target, ``a @ b`` (the current ``a``, the averaged
    ``b``) = ``Q R b`` (QR of ``a``) = ``Q U S V^T`` (SVD of the ``r x r``-sized ``R b``), so
    the new ``a = Q U`` has orthonormal columns and ``b = S V^T``; ``a @ b`` is unchanged
    (float32 rounding aside). Returns ``(new_trainable, extra)``."""
    a_new = {}

    def one(path, x):
        if not lora.is_lora(x):
            return x
        p = lora.path_str(path)
        q, rr = jnp.linalg.qr(extra["a"][p])
        u, sv, vt = jnp.linalg.svd(jnp.matmul(rr, x.b, precision=HIGHEST), full_matrices=False)
        a_new[p] = jnp.matmul(q, u, precision=HIGHEST)
        return x.replace(b=sv[:, None] * vt)

    trainable = jax.tree_util.tree_map_with_path(one, new_trainable, is_leaf=lora.is_lora)
    return trainable, {"a": a_new}


def mode_round(
    mode: str,
    trainable: PyTree,
    make: Callable[[Callable, bool], Callable],
    client_update: Callable,
    *,
    return_deltas: bool = False,
    lora_key: jax.Array | None = None,
    a_init: str = "uniform",
    client_ranks: tuple[int, ...] | None = None,
    client_noise: bool = False,
):
    """The round function of ``mode``, with the signature and outputs of
    :func:`~ffa_jax.federated.round.make_round`'s (``return_deltas``: also the releases).

    ``make(client_update, return_deltas) -> round_fn`` builds the jitted round. For ffa, lora
    and fedsb it is returned as it is. An alternating mode (rolora) gets one executable per
    phase of its cycle (compiled on first use), each with the client update restricted to
    that phase's factors; the call dispatches on ``state.round`` and the unsent factors are
    restored bit-identically after the server step. A mode with a server rule gets the
    clients' frozen tree from the server's extra state (:func:`client_frozen`) and its
    server step (jitted, pure) after the aggregation. ``lora_key``: the shared public LoRA key
    (FLoRA's re-initialisation draws from it); ``a_init``: ``lora.a_init``;
    ``client_ranks``: ``lora.client_ranks`` (:func:`ranked_client_update`).
    ``client_noise``: sample-level BandMF: ``state.noise`` holds every client's own noise
    stream state (leaves ``[N, ...]``); each participant's rows go to its client update as
    its ``client_state`` (the update's last argument) and its new rows come back in place
    (:func:`gather_clients` / :func:`scatter_clients`); nothing else reads them.
    """
    s = spec(mode)
    if not (s.alternating or s.server_rule or s.client_state or client_noise):
        return make(client_update, return_deltas)
    if client_noise and (s.client_state is not None or client_ranks is not None):
        raise ValueError("client_noise uses the round's client_state: not with fedsa/ranks.")
    need_releases = return_deltas or s.client_products or s.client_state is not None
    need_releases = need_releases or client_noise
    if s.client_state is not None:
        client_update = fedsa_client_update(client_update)
    if client_ranks is not None:
        rank = max(n.b.shape[0] for n in _nodes(trainable))
        client_update = ranked_client_update(client_update)
        need_releases = True
    masks = [round_mask(mode, trainable, t) for t in range(len(s.schedule))]
    if s.alternating:
        fns = [make(restrict_client_update(client_update, m), need_releases) for m in masks]
    else:
        fns = [make(client_update, need_releases)]
    if s.server_rule == "fedex":
        step = jax.jit(fedex_step)
    elif s.server_rule == "flora":
        if lora_key is None:
            raise ValueError("lora.mode='flora' needs lora_key (the shared public LoRA key).")
        step = jax.jit(flora_step, static_argnames="a_init")
    elif s.server_rule == "fedsvd":
        step = jax.jit(fedsvd_step)

    def round_fn(state, frozen, inputs, key):
        client_ids, weights = inputs.client_ids, inputs.weights
        phase = int(jax.device_get(state.round)) % len(fns)
        view = client_frozen(frozen, state.extra)
        if s.client_state is not None:
            own_b = gather_clients(state.extra["client_b"], client_ids)
            inputs = inputs._replace(client_state=own_b)
            view = frozen  # the clients bring their own b
        if client_ranks is not None:
            inputs = inputs._replace(client_state=rank_masks(client_ranks, rank, client_ids))
        if client_noise:
            inputs = inputs._replace(client_state=gather_clients(state.noise, client_ids))
        out = fns[phase](state, view, inputs, key)
        new = out[0]
        if client_noise:
            new = new._replace(noise=scatter_clients(state.noise, client_ids, out[2].client_states))
        trainable_, extra = new.trainable, state.extra
        if s.client_state is not None:
            rows = out[2].client_states
            extra = {"client_b": scatter_clients(extra["client_b"], client_ids, rows)}
        if s.alternating:
            trainable_ = keep_unsent(trainable_, state.trainable, masks[phase])
        if s.server_rule == "fedex":
            trainable_, extra = step(state.trainable, trainable_, out[2].deltas, weights, extra)
        elif s.server_rule == "flora":
            flora_key = jax.random.fold_in(lora_key, new.round)
            trainable_, extra = step(
                state.trainable, trainable_, out[2].deltas, weights, extra, flora_key, a_init=a_init
            )
        elif s.server_rule == "fedsvd":
            trainable_, extra = step(trainable_, extra)
        new = new._replace(trainable=trainable_, extra=extra)
        return (new, out[1], out[2]) if return_deltas else (new, out[1])

    return round_fn


def gather_clients(per_client: PyTree, client_ids) -> PyTree:
    """Rows ``client_ids`` (``[P]``; ids >= N are dummy slots: row 0, unused) of the
    ``[N, ...]`` leaves of ``per_client``."""
    ids = jnp.asarray(client_ids)
    n = jax.tree_util.tree_leaves(per_client)[0].shape[0]
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[jnp.where(ids < n, ids, 0)], per_client)


def scatter_clients(per_client: PyTree, client_ids, rows: PyTree) -> PyTree:
    """``per_client`` with rows ``client_ids`` replaced by ``rows`` (``[P, ...]``); dummy slots
    (ids >= N) write nothing."""
    ids = jnp.asarray(client_ids)
    return jax.tree_util.tree_map(
        lambda x, r: jnp.asarray(x).at[ids].set(r, mode="drop"), per_client, rows
    )


SERVER_RULES = {"fedex": fedex_step, "flora": flora_step, "fedsvd": fedsvd_step}


__all__ = [
    "SERVER_RULES",
    "SPECS",
    "client_frozen",
    "fedex_step",
    "fedsvd_step",
    "flora_stack",
    "flora_step",
    "fedsa_client_update",
    "gather_clients",
    "personal_params",
    "scatter_clients",
    "client_b",
    "init_state",
    "model_params",
    "ModeSpec",
    "check_config",
    "downlink_bytes",
    "keep_unsent",
    "mean_uplink_bytes",
    "mode_round",
    "rank_masks",
    "ranked_client_update",
    "no_adapter_note",
    "restrict_client_update",
    "round_mask",
    "sent_tree",
    "spec",
    "uplink_bytes",
]
