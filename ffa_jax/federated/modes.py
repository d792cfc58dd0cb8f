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
* ``rolora`` (RoLoRA, Chen et al. 2024, "Robust Federated Finetuning of LLMs via Alternating
  Optimization of LoRA"): even rounds (0, 2, ...) train and send ``b`` with ``a`` fixed, odd
  rounds train and send ``a`` with ``b`` fixed. Averaging one factor while the other is the
  same on every client is exact: ``mean_k(a) @ b_k`` has no cross terms.
* ``fedsb`` (Fed-SB, Singhal et al. 2025, "Fed-SB: A Silver Bullet for Extreme Communication
  Efficiency and Performance in (Private) Federated LoRA Fine-Tuning"): ``a`` and ``b``
  frozen (from the pretrained kernel's SVD or a public random draw, see
  :func:`ffa_jax.lora.fedsb_node`), only the ``r x r`` matrix ``mid`` between them trained and
  sent: ``w0 + s * a @ mid @ b``. The update is linear in ``mid``, so averaging is exact.

A classification head matched by the workload's head pattern is trained and sent in every
round by every mode (it is a plain leaf, averaged like FedAvg).

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ffa_jax import lora
from ffa_jax.config import LORA_MODES, RunConfig
from ffa_jax.errors import ConfigError
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
    """

    name: str
    title: str
    schedule: tuple[tuple[str, ...], ...]
    peft: bool = True
    init_from: bool = True

    def sent(self, round_idx: int) -> tuple[str, ...]:
        """The factors trained and sent in round ``round_idx`` (0-based)."""
        return self.schedule[int(round_idx) % len(self.schedule)]

    @property
    def alternating(self) -> bool:
        return len(self.schedule) > 1


SPECS: dict[str, ModeSpec] = {
    "ffa": ModeSpec(name="ffa", title="FFA-LoRA", schedule=(("b",),)),
    "lora": ModeSpec(name="lora", title="LoRA", schedule=(("a", "b"),)),
    "rolora": ModeSpec(name="rolora", title="RoLoRA", schedule=(("b",), ("a",))),
    "fedsb": ModeSpec(name="fedsb", title="Fed-SB", schedule=(("mid",),), init_from=False),
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
    if cfg.lora.init_from is not None and not s.init_from:
        raise ConfigError(
            f"lora.init_from={cfg.lora.init_from!r} cannot start lora.mode={s.name!r}: a PEFT "
            f"adapter holds A and B, but {s.title} trains an r x r matrix between frozen "
            "factors of its own init (lora.sb_init). Set lora.init_from: null, or use "
            "lora.mode: ffa or lora."
        )


def round_mask(mode: str, trainable: PyTree, round_idx: int) -> PyTree:
    """Bool tree over the server's ``trainable`` tree: True for the leaves clients train and
    send in round ``round_idx`` (the mode's factors of that round, and every plain leaf, i.e.
    the head). Use with :func:`ffa_jax.lora.split`."""
    return lora.factor_mask(trainable, spec(mode).sent(round_idx), plain=True)


def sent_tree(mode: str, trainable: PyTree, round_idx: int) -> PyTree:
    """The part of ``trainable`` (or of a delta shaped like it) sent in round ``round_idx``."""
    return lora.split(trainable, round_mask(mode, trainable, round_idx))[0]


def uplink_bytes(mode: str, trainable: PyTree, round_idx: int) -> int:
    """Bytes one client uploads in round ``round_idx``: its delta of the round's sent leaves
    (float32 factors and head). Analytic count per LoRA target ``[d_in, d_out]`` of rank r:
    ffa ``4 r d_out``; lora ``4 r (d_in + d_out)``; rolora ``4 r d_out`` (even rounds) /
    ``4 r d_in`` (odd); fedsb ``4 r^2``; plus the head's bytes."""
    return lora.tree_bytes(sent_tree(mode, trainable, round_idx))


def mean_uplink_bytes(mode: str, trainable: PyTree) -> int | float:
    """:func:`uplink_bytes` averaged over one cycle of the mode's schedule (the per-round
    upload of a mode that sends the same leaves every round)."""
    cycle = len(spec(mode).schedule)
    total = sum(uplink_bytes(mode, trainable, t) for t in range(cycle))
    return total // cycle if total % cycle == 0 else total / cycle


def downlink_bytes(mode: str, trainable: PyTree, round_idx: int) -> int:
    """Bytes the server sends each participant after round ``round_idx``: the leaves that the
    round's aggregate changed, i.e. the sent leaves (the others are bit-identical)."""
    return uplink_bytes(mode, trainable, round_idx)


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


def mode_round(mode: str, trainable: PyTree, make: Callable[[Callable], Callable], client_update):
    """The round function of ``mode``: ``make(client_update) -> round_fn`` builds the jitted
    :func:`~ffa_jax.federated.round.make_round` (same signature and outputs); for a mode whose
    clients train all of the server's tree in every round (ffa, lora, fedsb) it is returned
    as it is. For an alternating mode (rolora) one executable per phase of the cycle is
    built (compiled on first use), each with the client update restricted to that phase's
    factors, and the call dispatches on ``state.round``; the unsent factors are restored
    bit-identically after the server step."""
    s = spec(mode)
    if not s.alternating:
        return make(client_update)
    masks = [round_mask(mode, trainable, t) for t in range(len(s.schedule))]
    fns = [make(restrict_client_update(client_update, m)) for m in masks]
    def round_fn(state, *args, **kwargs):
        phase = int(jax.device_get(state.round)) % len(fns)
        out = fns[phase](state, *args, **kwargs)
        new_state = out[0]
        trainable_ = keep_unsent(new_state.trainable, state.trainable, masks[phase])
        return (new_state._replace(trainable=trainable_), *out[1:])

    return round_fn


__all__ = [
    "SPECS",
    "ModeSpec",
    "check_config",
    "downlink_bytes",
    "keep_unsent",
    "mean_uplink_bytes",
    "mode_round",
    "restrict_client_update",
    "round_mask",
    "sent_tree",
    "spec",
    "uplink_bytes",
]
