"""DP-SGD inside each federated client: per-example clipping, Gaussian noise, accounting.

Formal guarantee (of the three pieces together): sample-level differential privacy per
client; neighbouring datasets differ in one example of one client; the server adds no noise.
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
from ffa_jax.privacy.clipping import GradStats, clipped_grad, mean_grad
from ffa_jax.privacy.noise import (
    PrivatizerState,
    gaussian_noise_like,
    gaussian_privatizer,
    privatize_grad_sum,
)

__all__ = [
    "ACCOUNTANTS",
    "CALIBRATION_RTOL",
    "PLD_VALUE_DISCRETIZATION",
    "RDP_ORDERS",
    "GradStats",
    "PrivatizerState",
    "calibrate_noise_multiplier",
    "clipped_grad",
    "dp_sgd_event",
    "epsilon_curve",
    "epsilon_spent",
    "gaussian_noise_like",
    "gaussian_privatizer",
    "make_accountant",
    "mean_grad",
    "privatize_grad_sum",
]
