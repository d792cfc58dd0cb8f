"""Differential privacy of federated fine-tuning: clipping, Gaussian noise, accounting, audit.

Two privacy units (``privacy.unit``):

* sample-level (DP-SGD inside each client; :mod:`clipping`, :mod:`noise`, :mod:`accounting`;
  :mod:`bookkeeping` clips FFA-LoRA and LoRA on stock Flax layers without per-example
  gradients).
  Formal guarantee: neighbouring datasets differ in one example of one client; the server adds
  no noise and only sees noisy updates.
* client-level (DP-FedAvg at the server; :func:`ffa_jax.federated.server.dp_fedavg_aggregate`,
  :mod:`client_level`). Formal guarantee: neighbouring datasets differ in all the data of one
  client (add/remove; replace-one for fixed-size client sampling); the server is trusted with
  the clipped updates and adds the noise.

:mod:`ledger` records what a run spent as dp-accounting DpEvents (PLD and RDP) and
:mod:`audit` scores canaries into empirical epsilon lower bounds (``jax_privacy.auditing``);
the planner and the audit of a whole run live in :mod:`ffa_jax.run`.
"""

from ffa_jax.privacy.accounting import (
    ACCOUNTANTS,
    CALIBRATION_RTOL,
    PLD_VALUE_DISCRETIZATION,
    RDP_ORDERS,
    calibrate_noise_multiplier,
    dp_sgd_event,
    epsilon_curve,
    epsilon_spent,
    make_accountant,
)
from ffa_jax.privacy.bookkeeping import CLIPPING_METHODS, clipped_grad_auto
from ffa_jax.privacy.clipping import GradStats, clipped_grad, mean_grad
from ffa_jax.privacy.noise import (
    gaussian_noise_like,
    gaussian_privatizer,
    privatize_grad_sum,
)

__all__ = [
    "ACCOUNTANTS",
    "CLIPPING_METHODS",
    "CALIBRATION_RTOL",
    "PLD_VALUE_DISCRETIZATION",
    "RDP_ORDERS",
    "GradStats",
    "calibrate_noise_multiplier",
    "clipped_grad",
    "clipped_grad_auto",
    "dp_sgd_event",
    "epsilon_curve",
    "epsilon_spent",
    "gaussian_noise_like",
    "gaussian_privatizer",
    "make_accountant",
    "mean_grad",
    "privatize_grad_sum",
]
