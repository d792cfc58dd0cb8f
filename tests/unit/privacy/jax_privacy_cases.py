"""Fixed inputs of the before/after-jax-privacy equivalence test (tests/unit/privacy/
test_jax_privacy_equivalence.py). A plain module (no tests) so that the recorder script that
ran the pre-jax-privacy code and the test read exactly the same inputs."""

import jax
import jax.numpy as jnp
import numpy as np

D_IN, HIDDEN, D_OUT, B = 6, 5, 3, 12
# Real examples first, as data.batching lays out padded Poisson batches.
MASKS = {
    "full": np.ones(B, bool),
    "poisson_like": np.arange(B) < 7,
    "one_real": np.arange(B) < 1,
    "empty": np.zeros(B, bool),
}
CLIPS = (0.05, 0.7, 1e4)
MICROBATCHES = (None, 1, 3, 4, 12)


def params(seed: int):
    """A tiny two-layer model split FFA-style: trainable ``b`` (like LoRA's B), frozen ``a``
    (like LoRA's A) and a frozen head; only the trainable tree may be differentiated."""
    ka, kb, kh = jax.random.split(jax.random.key(seed), 3)
    trainable = {"b": 0.3 * jax.random.normal(kb, (HIDDEN, HIDDEN)), "bias": jnp.zeros(HIDDEN)}
    frozen = {
        "a": jax.random.normal(ka, (D_IN, HIDDEN)) / np.sqrt(D_IN),
        "head": jax.random.normal(kh, (HIDDEN, D_OUT)) / np.sqrt(HIDDEN),
    }
    return trainable, frozen


def loss_fn(trainable, frozen, example):
    h = jnp.tanh(example["x"] @ frozen["a"])
    h = h + h @ trainable["b"] + trainable["bias"]
    return jnp.sum(jnp.square(h @ frozen["head"] - example["y"]))


def batch(seed: int, scale: float = 3.0):
    kx, ky = jax.random.split(jax.random.key(100 + seed))
    return {
        "x": scale * jax.random.normal(kx, (B, D_IN)),
        "y": jax.random.normal(ky, (B, D_OUT)),
    }


def case_names():
    return [f"{m}-{c}-{mb}" for m in MASKS for c in CLIPS for mb in MICROBATCHES]


def run_case(clipped_grad, name: str):
    """Outputs of ``clipped_grad`` for one case, as a dict of float64 arrays."""
    m, c, mb = name.split("-")
    mb = None if mb == "None" else int(mb)
    trainable, frozen = params(0)
    g, stats = jax.jit(clipped_grad(loss_fn, float(c), microbatch_size=mb))(
        trainable, frozen, batch(0), MASKS[m]
    )
    out = {f"grad/{k}": np.asarray(v, np.float64) for k, v in g.items()}
    out.update({f"stats/{k}": np.asarray(v, np.float64) for k, v in stats._asdict().items()})
    return out
