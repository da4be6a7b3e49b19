"""Preference losses against independent float64 numpy versions of their formulas (TRL's dpo_loss)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.align import losses


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_sig(x):
    return np.exp(np_logsig(x))


def np_loss(name, s_c, s_r, ref_c, ref_r, n_c, n_r, *, beta, label_smoothing=0.0, gamma=0.0,
            discopop_tau=0.05, running_mean=0.0):
    """Each formula written out from TRL's DPOTrainer.dpo_loss (and the papers), in float64."""
    s_c, s_r, ref_c, ref_r = (np.asarray(a, np.float64) for a in (s_c, s_r, ref_c, ref_r))
    n_c = np.maximum(np.asarray(n_c, np.float64), 1.0)
    n_r = np.maximum(np.asarray(n_r, np.float64), 1.0)
    eps = label_smoothing
    rho_c, rho_r = s_c - ref_c, s_r - ref_r
    logits = beta * ((s_c - s_r) - (ref_c - ref_r))
    if name == "dpo":
        return -np_logsig(logits) * (1 - eps) - np_logsig(-logits) * eps
    if name == "ln_dpo":
        z = beta * (rho_c / n_c - rho_r / n_r)
        return -np_logsig(z) * (1 - eps) - np_logsig(-z) * eps
    if name == "ipo":
        return ((s_c - ref_c) / n_c - (s_r - ref_r) / n_r - 1 / (2 * beta)) ** 2
    if name == "simpo":
        z = beta * (s_c / n_c - s_r / n_r) - gamma
        return -np_logsig(z) * (1 - eps) - np_logsig(-z) * eps
    if name == "hinge":
        return np.maximum(0.0, 1 - logits)
    if name == "robust":
        return (-np_logsig(logits) * (1 - eps) + np_logsig(-logits) * eps) / (1 - 2 * eps)
    if name == "exo_pair":
        eps = eps if eps else 1e-3
        return (np_sig(logits) * (np_logsig(logits) - np.log(1 - eps))
                + np_sig(-logits) * (np_logsig(-logits) - np.log(eps)))
    if name == "nca_pair":
        cr, rr = beta * rho_c, beta * rho_r
        return -np_logsig(cr) - 0.5 * np_logsig(-cr) - 0.5 * np_logsig(-rr)
    if name == "bco_pair":
        return -np_logsig(beta * rho_c - running_mean) - np_logsig(-(beta * rho_r - running_mean))
    if name == "sppo_hard":
        return (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
    if name == "apo_zero":
        return (1 - np_sig(beta * rho_c)) + np_sig(beta * rho_r)
    if name == "apo_down":
        return np_sig(beta * rho_c) + (1 - np_sig(logits))
    if name == "aot":
        d = np.sort(s_c - s_r) - np.sort(ref_c - ref_r)
        return -np_logsig(beta * d) * (1 - eps) - np_logsig(-beta * d) * eps
    if name == "aot_unpaired":
        d = np.sort(rho_c) - np.sort(rho_r)
        return -np_logsig(beta * d) * (1 - eps) - np_logsig(-beta * d) * eps
    if name == "discopop":
        with np.errstate(over="ignore", invalid="ignore"):
            m = np_sig(logits / discopop_tau)
            return -np_logsig(logits) * (1 - m) + np.exp(-logits) * m
    raise AssertionError(name)


# Hyperparameter settings per loss: the defaults plus the loss's own knobs.
VARIANTS = {
    "dpo": [{"label_smoothing": 0.1}], "ln_dpo": [{"label_smoothing": 0.2}],
    "simpo": [{"gamma": 0.5}, {"gamma": 1.0, "label_smoothing": 0.1}], "robust": [{"label_smoothing": 0.1}],
    "exo_pair": [{"label_smoothing": 0.05}], "bco_pair": [{"running_mean": 0.3}],
    "aot": [{"label_smoothing": 0.1}], "aot_unpaired": [{"label_smoothing": 0.1}],
    "discopop": [{"discopop_tau": 0.5}],
}
CASES = [(n, kw) for n in losses.NAMES for kw in [{}] + VARIANTS.get(n, [])]
CASE_IDS = [n + "".join(f"-{k}={v}" for k, v in kw.items()) for n, kw in CASES]


def random_batch(seed=0, batch=64):
    rng = np.random.default_rng(seed)
    s_c = -rng.uniform(1.0, 80.0, batch)
    s_r = -rng.uniform(1.0, 80.0, batch)
    ref_c = s_c + rng.normal(0.0, 4.0, batch)
    ref_r = s_r + rng.normal(0.0, 4.0, batch)
    n_c = rng.integers(1, 60, batch)
    n_r = rng.integers(1, 60, batch)
    return [np.float32(a) for a in (s_c, s_r, ref_c, ref_r)] + [n_c.astype(np.int32), n_r.astype(np.int32)]


def jax_loss(name, arrays, **kw):
    return np.asarray(losses.preference_loss(name, *(None if a is None else jnp.asarray(a) for a in arrays), **kw))


def test_names_and_registry():
    assert set(losses.NAMES) == {"dpo", "ln_dpo", "ipo", "simpo", "hinge", "robust", "exo_pair", "nca_pair",
                            "bco_pair", "sppo_hard", "apo_zero", "apo_down", "aot", "aot_unpaired",
                            "discopop"}
    assert losses.REFERENCE_FREE == {"simpo"}
    assert losses.HYPERPARAMETERS["discopop"] == {"discopop_tau": 0.05}  # TRL's default
    assert losses.HYPERPARAMETERS["bco_pair"] == {"running_mean": 0.0}


@pytest.mark.parametrize("beta", [0.1, 2.0])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_matches_numpy_on_random_pairs(name, kw, beta):
    arrays = random_batch(seed=int(beta * 10))
    got = jax_loss(name, arrays, beta=beta, **kw)
    want = np_loss(name, *arrays, beta=beta, **kw)
    assert got.shape == (64,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_equal_logps_and_zero_or_unit_lengths(name, kw):
    s = np.full(4, -5.0, np.float32)
    arrays = [s, s, s, s, np.array([1, 0, 7, 1]), np.array([1, 1, 3, 0])]
    got = jax_loss(name, arrays, beta=0.5, **kw)
    np.testing.assert_allclose(got, np_loss(name, *arrays, beta=0.5, **kw), rtol=1e-6, atol=1e-6)
    if not kw and name in {"dpo", "ln_dpo", "aot", "aot_unpaired"}:  # Delta = 0: log 2
        np.testing.assert_allclose(got, np.log(2.0), rtol=1e-6)
    # A length of 0 is clamped to 1.
    clamped = arrays[:4] + [np.maximum(arrays[4], 1), np.maximum(arrays[5], 1)]
    np.testing.assert_array_equal(got, jax_loss(name, clamped, beta=0.5, **kw))


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_huge_margins_stay_finite(name, kw, beta):
    # Delta = +1e4 for pair 0 and -1e4 for pair 1 (rho = +-5000), lengths 1.
    s_c = np.array([4990.0, -5010.0], np.float32)
    s_r = np.array([-5010.0, 4990.0], np.float32)
    ref = np.array([-10.0, -10.0], np.float32)
    ones = np.ones(2, np.int32)
    arrays = [s_c, s_r, ref, ref, ones, ones]
    got = jax_loss(name, arrays, beta=beta, **kw)
    assert np.all(np.isfinite(got)), got
    want = np_loss(name, *arrays, beta=beta, **kw)
    ok = np.isfinite(want)  # the naive discopop formula is inf * 0 at Delta = -1e4
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-5)
    if name == "discopop":  # the modulation vanishes, leaving -log sigmoid(z) = |z|
        np.testing.assert_allclose(got[1], beta * 1e4, rtol=1e-5)

    def total(sc, sr):
        return losses.preference_loss(name, sc, sr, jnp.asarray(ref), jnp.asarray(ref), ones, ones,
                                 beta=beta, **kw).sum()

    grads = jax.grad(total, argnums=(0, 1))(jnp.asarray(s_c), jnp.asarray(s_r))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads), grads


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_gradient_closed_form(beta):
    s_c, s_r, ref_c, ref_r, n_c, n_r = random_batch(seed=3)
    grad_c, grad_r = jax.grad(
        lambda a, b: losses.preference_loss("dpo", a, b, ref_c, ref_r, n_c, n_r, beta=beta).sum(), argnums=(0, 1)
    )(jnp.asarray(s_c), jnp.asarray(s_r))
    delta = (s_c.astype(np.float64) - ref_c) - (s_r.astype(np.float64) - ref_r)
    want = -beta * np_sig(-beta * delta)
    np.testing.assert_allclose(np.asarray(grad_c), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad_r), -want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ln_dpo_is_dpo_at_unit_lengths_only(eps):
    s_c, s_r, ref_c, ref_r, n_c, n_r = random_batch(seed=4)
    ones = np.ones_like(n_c)
    unit = [s_c, s_r, ref_c, ref_r, ones, ones]
    np.testing.assert_allclose(jax_loss("ln_dpo", unit, beta=0.1, label_smoothing=eps),
                               jax_loss("dpo", unit, beta=0.1, label_smoothing=eps), rtol=1e-6)
    varied = [s_c, s_r, ref_c, ref_r, n_c, n_r]
    differs = jax_loss("ln_dpo", varied, beta=0.1, label_smoothing=eps) != jax_loss(
        "dpo", varied, beta=0.1, label_smoothing=eps)
    assert differs[(n_c > 1) | (n_r > 1)].all()


def test_simpo_runs_without_reference_and_ignores_it():
    s_c, s_r, ref_c, ref_r, n_c, n_r = random_batch(seed=5)
    free = jax_loss("simpo", [s_c, s_r, None, None, n_c, n_r], beta=2.0, gamma=0.5)
    with_ref = jax_loss("simpo", [s_c, s_r, ref_c, ref_r, n_c, n_r], beta=2.0, gamma=0.5)
    np.testing.assert_array_equal(free, with_ref)
    metrics = losses.preference_metrics(s_c, s_r, None, None, n_c, n_r, beta=2.0)
    np.testing.assert_allclose(metrics["rewards/chosen"], 2.0 * s_c.astype(np.float64).mean(), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(set(losses.NAMES) - losses.REFERENCE_FREE))
def test_missing_reference_raises(name):
    s_c, s_r, _, ref_r, n_c, n_r = random_batch(seed=6)
    with pytest.raises(ValueError, match=f"'{name}' needs the reference"):
        losses.preference_loss(name, s_c, s_r, None, None, n_c, n_r, beta=0.1)
    with pytest.raises(ValueError, match="needs the reference"):
        losses.preference_loss(name, s_c, s_r, None, ref_r, n_c, n_r, beta=0.1)


def test_bad_names_and_hyperparameters_raise():
    s_c, s_r, ref_c, ref_r, n_c, n_r = random_batch(seed=7)
    args = (s_c, s_r, ref_c, ref_r, n_c, n_r)
    with pytest.raises(ValueError, match="unknown preference loss 'sigmoid'") as err:
        losses.preference_loss("sigmoid", *args, beta=0.1)
    assert all(n in str(err.value) for n in losses.NAMES)
    with pytest.raises(ValueError, match="label_smoothing=0.1 has no effect on preference loss 'hinge'"):
        losses.preference_loss("hinge", *args, beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="gamma=1.0 has no effect"):
        losses.preference_loss("dpo", *args, beta=0.1, gamma=1.0)
    with pytest.raises(ValueError, match="takes no hyperparameter discopop_tau"):
        losses.preference_loss("dpo", *args, beta=0.1, discopop_tau=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        losses.preference_loss("dpo", *args, beta=0.0)
    with pytest.raises(ValueError, match="robust needs 0 <= label_smoothing < 0.5"):
        losses.preference_loss("robust", *args, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="'ln_dpo' normalises by length"):
        losses.preference_loss("ln_dpo", s_c, s_r, ref_c, ref_r, None, None, beta=0.1)
    # Losses that do not use the lengths run without them.
    assert losses.preference_loss("dpo", s_c, s_r, ref_c, ref_r, None, None, beta=0.1).shape == (64,)


def test_sft_weight_adds_mean_token_nll_of_chosen():
    arrays = random_batch(seed=8)
    s_c, n_c = arrays[0], arrays[4]
    base = jax_loss("ln_dpo", arrays, beta=0.1)
    rpo = jax_loss("ln_dpo", arrays, beta=0.1, sft_weight=0.7)
    np.testing.assert_allclose(rpo - base, 0.7 * -s_c.astype(np.float64) / np.maximum(n_c, 1), rtol=1e-5)
    grad_sft = jax.grad(lambda a: losses.sft_nll(a, n_c).sum())(jnp.asarray(s_c))
    np.testing.assert_allclose(np.asarray(grad_sft), -1.0 / n_c, rtol=1e-6)


@pytest.mark.parametrize("name,kw", [(n, {}) for n in losses.NAMES] + [("simpo", {"gamma": 0.5})])
def test_jit_matches_eager(name, kw):
    s_c, s_r, ref_c, ref_r, n_c, n_r = random_batch(seed=9, batch=8)
    if name in losses.REFERENCE_FREE:
        ref_c = ref_r = None
    fn = jax.jit(functools.partial(losses.preference_loss, name, beta=0.3, sft_weight=0.1, **kw))
    np.testing.assert_allclose(np.asarray(fn(s_c, s_r, ref_c, ref_r, n_c, n_r)),
                               jax_loss(name, [s_c, s_r, ref_c, ref_r, n_c, n_r], beta=0.3, sft_weight=0.1,
                                        **kw), rtol=1e-6, atol=1e-6)


def test_bf16_inputs_are_computed_in_float32():
    s_c, s_r, ref_c, ref_r, n_c, n_r = (jnp.asarray(a) for a in random_batch(seed=10))
    got = losses.preference_loss("dpo", s_c.astype(jnp.bfloat16), s_r, ref_c, ref_r, n_c, n_r, beta=0.1)
    assert got.dtype == jnp.float32


METRIC_INPUTS = dict(
    chosen_logps=np.array([-10.0, -20.0, -5.0]), rejected_logps=np.array([-12.0, -17.0, -5.0]),
    ref_chosen_logps=np.array([-11.0, -21.0, -5.0]), ref_rejected_logps=np.array([-11.0, -19.0, -5.0]),
    chosen_lengths=np.array([4, 6, 1]), rejected_lengths=np.array([3, 5, 0]),
)


def test_metrics_by_hand():
    # rho_c = [1, 1, 0], rho_r = [-1, 2, 0]; the third pair is a tie (not counted as correct).
    m = jax.jit(functools.partial(losses.preference_metrics, beta=0.5))(**METRIC_INPUTS)
    want = {
        "rewards/chosen": 0.5 * 2 / 3, "rewards/rejected": 0.5 * 1 / 3, "rewards/accuracies": 1 / 3,
        "rewards/margins": 0.5 * 1 / 3, "logps/chosen": -35 / 3, "logps/rejected": -34 / 3,
        "lengths/chosen": 11 / 3, "lengths/rejected": 8 / 3,
    }
    assert set(m) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(float(m[key]), value, rtol=1e-6, err_msg=key)


def test_metrics_reference_free_take_reference_as_zero():
    inputs = dict(METRIC_INPUTS, ref_chosen_logps=None, ref_rejected_logps=None)
    m = losses.preference_metrics(**inputs, beta=0.5)
    np.testing.assert_allclose(float(m["rewards/chosen"]), 0.5 * -35 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(m["rewards/rejected"]), 0.5 * -34 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(m["rewards/accuracies"]), 1 / 3, rtol=1e-6)  # -10 > -12 only
    np.testing.assert_allclose(float(m["rewards/margins"]), 0.5 * -1 / 3, rtol=1e-6)
