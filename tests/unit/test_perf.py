"""perf.microbatch_size / perf.clients_per_chunk ``auto`` (ffa_jax.perf): what it resolves to,
B_max padded up to a multiple of the micro-batch, bad values named before any compute, and the
same training result as the explicit whole-batch setting (up to float summation order)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffa_jax import perf
from ffa_jax.config import PerfConfig, load_config
from ffa_jax.data.batching import physical_batch_size
from ffa_jax.errors import ConfigError
from tests._tiny import tiny_overrides


def _resolve(backend="cpu", batch=64, processes=1, **fields):
    return perf.resolve(
        PerfConfig(**fields),
        expected_batch_size=batch,
        backend=backend,
        num_processes=processes,
    )


def test_auto_on_cpu_skips_padding_one_client_at_a_time():
    r = _resolve("cpu")
    assert physical_batch_size(64) == 105
    assert (r.microbatch_size, r.clients_per_chunk) == (perf.AUTO_MICROBATCH, 1)
    assert (r.base_max_batch_size, r.max_batch_size) == (105, 112)
    assert r.max_batch_size % r.microbatch_size == 0
    assert "perf.microbatch_size=16" in r.describe() and "B_max=112" in r.describe()


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_on_accelerators_fills_the_device(backend):
    r = _resolve(backend)
    # Whole padded batch, all clients vmapped (0 = all); B_max is the CPU one.
    assert (r.microbatch_size, r.clients_per_chunk, r.max_batch_size) == (0, 0, 112)


@pytest.mark.parametrize("kw", [{"processes": 2}, {"devices": 2}, {"model_devices": 2}], ids=str)
def test_auto_keeps_all_clients_together_when_a_mesh_spreads_them(kw):
    processes = kw.pop("processes", 1)
    r = _resolve("cpu", processes=processes, **kw)
    assert (r.microbatch_size, r.clients_per_chunk) == (0, 0)


def test_b_max_does_not_depend_on_the_backend():
    # The privacy plan sees B_max: ffa-jax privacy (any machine) and train must agree.
    for batch in (1, 8, 16, 64, 200):
        sizes = {_resolve(b, batch=batch).max_batch_size for b in ("cpu", "gpu", "tpu")}
        assert sizes == {perf.max_batch_size(PerfConfig(), batch)}


def test_small_batches_are_not_padded():
    # B_max <= 16: one micro-batch already, nothing to pad.
    base = physical_batch_size(2)
    assert base <= perf.AUTO_MICROBATCH
    r = _resolve("cpu", batch=2)
    assert (r.microbatch_size, r.max_batch_size) == (0, base)


@pytest.mark.parametrize(
    ("m", "b_max"), [(0, 105), (1, 105), (15, 105), (16, 112), (10, 110), (105, 105), (500, 105)]
)
def test_explicit_microbatch_pads_b_max_up_to_a_multiple(m, b_max):
    r = _resolve("cpu", microbatch_size=m, clients_per_chunk=1)
    assert r.max_batch_size == b_max
    assert r.microbatch_size == m
    if 0 < m < b_max:
        assert b_max % m == 0


@pytest.mark.parametrize("field", ["microbatch_size", "clients_per_chunk"])
@pytest.mark.parametrize("bad", [-1, "fast", True, 1.5, None])
def test_bad_values_are_config_errors_naming_the_field(field, bad):
    with pytest.raises(ConfigError, match=f"perf.{field}="):
        PerfConfig(**{field: bad})
    # The CLI path: --set perf.field=value fails while the config is read (before compute).
    if bad is not None and not isinstance(bad, bool):
        with pytest.raises(ConfigError, match=f"perf.{field}="):
            load_config(None, [f"perf.{field}={bad}"])


def test_resolved_chunk_must_be_divisible_by_devices():
    with pytest.raises(ConfigError, match="perf.devices=2 .*perf.clients_per_chunk=3"):
        _resolve("gpu", clients_per_chunk=3, devices=2)


def test_auto_is_the_default_and_round_trips_through_yaml():
    cfg = load_config(None)
    assert (cfg.perf.microbatch_size, cfg.perf.clients_per_chunk) == ("auto", "auto")
    explicit = load_config(None, ["perf.microbatch_size=16", "perf.clients_per_chunk=1"])
    assert (explicit.perf.microbatch_size, explicit.perf.clients_per_chunk) == (16, 1)
    r = perf.resolve(cfg.perf, expected_batch_size=64, backend="cpu")
    resolved = perf.resolved_config(cfg, r)
    assert (resolved.perf.microbatch_size, resolved.perf.clients_per_chunk) == (16, 1)


# ------------------------------------------------------------------ one round, auto vs explicit


def _one_round(model_dir, out, *extra):
    from ffa_jax import run as train_lib
    from ffa_jax.federated.server import server_init

    cfg = load_config(
        None,
        tiny_overrides(
            model_dir,
            out,
            "p",
            # A fixed sigma: the noise does not depend on B_max (calibration would, by 1e-4).
            "privacy.noise_multiplier=1.0",
            "privacy.noise_seed=0",  # the same noise and Poisson draws in both runs
            "privacy.accountant=rdp",
            "perf.devices=1",
            *extra,
        ),
    )
    prep = train_lib.prepare(cfg, log=lambda *a: None)
    round_fn, opt = train_lib.build_round(prep)
    state = jax.device_get(server_init(prep.trainable, opt))
    inp = train_lib.round_inputs(prep, 0)
    new, m = train_lib.run_round(round_fn, prep, state, inp, train_lib.train_key(prep))
    return prep, jax.device_get(new.trainable), m


def test_auto_equals_the_explicit_whole_batch_round(tmp_path):
    from tests._tiny import tiny_model_dir

    model = tiny_model_dir(tmp_path / "tiny")
    # perf.devices=1 makes auto sequential on CPU even with the 8 simulated test devices.
    prep_a, auto, ma = _one_round(model, tmp_path)
    prep_e, expl, me = _one_round(
        model, tmp_path, "perf.microbatch_size=0", "perf.clients_per_chunk=0"
    )
    assert prep_a.perf.backend == jax.default_backend() == "cpu"
    assert (prep_a.cfg.perf.microbatch_size, prep_a.cfg.perf.clients_per_chunk) == (16, 1)
    # B_max 22 (expected batch 8) padded to 32 for the micro-batch; the explicit run keeps 22.
    assert (prep_e.max_batch_size, prep_a.max_batch_size) == (physical_batch_size(8), 32)
    # The same examples are sampled (Poisson draws do not depend on B_max) ...
    np.testing.assert_array_equal(np.asarray(ma.clients.num_examples), me.clients.num_examples)
    # ... and give the same update up to float summation order.
    for a, e in zip(jax.tree.leaves(auto), jax.tree.leaves(expl), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(ma.loss), float(me.loss), rtol=1e-5)


# ------------------------------------------------------------------------------ evaluation


@pytest.mark.parametrize(
    ("n", "cap", "size"), [(1209, 112, 110), (1209, 64, 64), (32, 32, 32), (23, 10, 8), (5, 64, 5)]
)
def test_eval_batches_are_balanced(n, cap, size):
    from ffa_jax.workloads import balanced_eval_batch

    b = balanced_eval_batch(n, cap)
    assert b == size and b <= cap
    # As few batches as the cap allows, and less than one row of padding per batch.
    assert -(-n // b) == -(-n // cap)
    assert -(-n // b) * b - n < -(-n // b)


def test_eval_batch_auto_is_b_max_and_explicit_stays():
    cfg = load_config(None)
    assert cfg.eval.batch_size == "auto"
    r = perf.resolve(cfg.perf, expected_batch_size=64, backend="cpu")
    assert r.eval_batch_size == r.max_batch_size == 112
    assert perf.resolved_config(cfg, r).eval.batch_size == 112
    r = perf.resolve(cfg.perf, expected_batch_size=64, backend="gpu", eval_batch_size=8)
    assert r.eval_batch_size == 8
    with pytest.raises(ConfigError, match="eval.batch_size"):
        load_config(None, ["eval.batch_size=0"])


def test_evaluation_compiles_once_for_every_call_and_the_padded_last_batch():
    from ffa_jax import xla_options
    from ffa_jax.workloads import classification_evaluator

    traces = []

    @jax.jit
    def eval_fn(params, batch, mask):
        traces.append(batch["x"].shape)  # runs only when jax traces (compiles) anew
        pred = batch["x"] * params["w"] > 0
        correct = (pred == batch["label"].astype(bool)) & mask
        loss = jnp.where(mask, jnp.abs(batch["x"] * params["w"]), 0.0)
        return {"correct": jnp.sum(correct), "loss_sum": jnp.sum(loss), "count": jnp.sum(mask)}

    rng = np.random.default_rng(0)
    x = rng.standard_normal(23).astype(np.float32)
    label = (rng.random(23) > 0.5).astype(np.int32)
    ev = classification_evaluator(
        eval_fn, {"x": x, "label": label}, 10, xla_options.compiler_options("off", "encoder")
    )
    for w in (1.0, -2.0, 0.5):
        got = ev({"w": np.float32(w)})
        want = float(np.mean((x * w > 0) == label.astype(bool)))
        assert got["eval_accuracy"] == pytest.approx(want)
        assert got["eval_loss"] == pytest.approx(float(np.mean(np.abs(x * w))), rel=1e-6)
    # 3 batches of 8 (the last padded by one), 3 calls: one shape, one compilation.
    assert traces == [(8,)]


@pytest.mark.parametrize("m, tail", [(16, 4), (15, 3), (8, 2), (32, 8), (7, 0), (1, 0)])
def test_tail_microbatch_is_the_largest_divisor_up_to_a_quarter(m, tail):
    assert perf.tail_microbatch_size(m) == tail


def test_tail_split_only_on_sequential_cpu_runs():
    assert _resolve("cpu").tail_microbatch_size == 4
    assert "tail in 4s" in _resolve("cpu").describe()
    assert _resolve("gpu").tail_microbatch_size == 0
    assert _resolve("cpu", processes=2).tail_microbatch_size == 0
    # A micro-batch as large as B_max is no micro-batching: nothing to split.
    assert _resolve("cpu", batch=2).tail_microbatch_size == 0
    assert _resolve("cpu", microbatch_size=8, clients_per_chunk=1).tail_microbatch_size == 2


def test_a_resumed_run_keeps_its_b_max_when_the_micro_batch_still_divides_it():
    # RDP sizes B_max from the rounds and the budget (batch_overflow_probability): a run
    # extended on resume keeps the checkpoint's B_max instead of a new one.
    assert _resolve("cpu").max_batch_size == 112
    kept = perf.resolve(
        PerfConfig(), expected_batch_size=64, backend="cpu", max_batch_size_of_run=128
    )
    assert kept.max_batch_size == 128
    # Not a multiple of the micro-batch, or below the plain Poisson bound: not kept (the
    # checkpoint check then names the change).
    for b in (120, 96):
        r = perf.resolve(
            PerfConfig(), expected_batch_size=64, backend="cpu", max_batch_size_of_run=b
        )
        assert r.max_batch_size == 112
