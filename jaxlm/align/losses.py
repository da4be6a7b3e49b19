"""Pairwise preference losses (DPO, LN-DPO and the *PO family) as pure jnp functions.

Every loss takes, per pair, the summed response log-probabilities under the policy and the reference
plus the response token counts, and returns per-pair losses [B] (the caller takes the mean):

    s_c, s_r          summed log-probs of the chosen / rejected response under the policy
    s_ref_c, s_ref_r  the same under the reference model
    rho_c = s_c - s_ref_c,  rho_r = s_r - s_ref_r,  Delta = rho_c - rho_r
    |y|               response token count, clamped to >= 1
    eps               label smoothing

`beta` appears exactly once in every formula (MaxText's first DPO applied it twice). Hyperparameters
are Python floats, so `preference_loss` jits with the name and hyperparameters static. Sigmoid terms
use `jax.nn.log_sigmoid` / `jax.nn.sigmoid` of a logit, never log(sigmoid(x)), so a margin of 1e4
gives finite losses and gradients. Inputs are promoted to at least float32.

Names and hyperparameter defaults follow TRL's `DPOTrainer` (loss_type), except: `dpo` is TRL's
"sigmoid", `ln_dpo` is TRL's "sigmoid_norm", `simpo` takes the raw margin gamma (TRL's CPOTrainer
uses gamma = gamma_beta_ratio * beta), and `bco_pair` takes its running reward mean as an argument.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

Array = jax.Array
_ls = jax.nn.log_sigmoid


def _f(x) -> Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _len(n) -> Array:
    return jnp.maximum(_f(n), 1.0)


def _ratios(s_c, s_r, ref_c, ref_r):
    return _f(s_c) - _f(ref_c), _f(s_r) - _f(ref_r)


def _conservative(z: Array, eps: float) -> Array:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): BCE on logit z with labels flipped at rate eps."""
    return -(1.0 - eps) * _ls(z) - eps * _ls(-z)


# ---------------------------------------------------------------------------------------------------
# The losses. All share the argument list of `preference_loss`; unused arguments are ignored.


def dpo(s_c, s_r, ref_c, ref_r, len_c=None, len_r=None, *, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al., 2023), TRL "sigmoid".

    loss = -log sigmoid(beta * Delta); with eps > 0 conservative DPO (Mitchell, 2023):
    loss = -(1 - eps) log sigmoid(beta * Delta) - eps log sigmoid(-beta * Delta).
    """
    rho_c, rho_r = _ratios(s_c, s_r, ref_c, ref_r)
    return _conservative(beta * (rho_c - rho_r), label_smoothing)


def ln_dpo(s_c, s_r, ref_c, ref_r, len_c, len_r, *, beta: float, label_smoothing: float = 0.0):
    """Length-normalised DPO (Ahrabian et al., "A Practical Analysis of Human Alignment with *PO",
    NAACL Findings 2025), TRL "sigmoid_norm".

    loss = -log sigmoid(beta * (rho_c / |y_c| - rho_r / |y_r|)), with the same label smoothing as `dpo`.
    Equals `dpo` when every length is 1.
    """
    rho_c, rho_r = _ratios(s_c, s_r, ref_c, ref_r)
    return _conservative(beta * (rho_c / _len(len_c) - rho_r / _len(len_r)), label_smoothing)


def ipo(s_c, s_r, ref_c, ref_r, len_c, len_r, *, beta: float):
    """IPO (Azar et al., 2023, eq. 17; beta is the paper's tau), length-normalised as in TRL "ipo".

    loss = ((rho_c / |y_c| - rho_r / |y_r|) - 1 / (2 beta))^2
    """
    rho_c, rho_r = _ratios(s_c, s_r, ref_c, ref_r)
    return (rho_c / _len(len_c) - rho_r / _len(len_r) - 1.0 / (2.0 * beta)) ** 2


def simpo(s_c, s_r, ref_c=None, ref_r=None, len_c=None, len_r=None, *, beta: float, gamma: float = 0.0,
          label_smoothing: float = 0.0):
    """SimPO (Meng et al., 2024); reference-free: ref_c and ref_r are ignored.

    loss = -log sigmoid(beta * (s_c / |y_c| - s_r / |y_r|) - gamma)
    gamma is the raw target margin of the paper, NOT TRL's gamma_beta_ratio (TRL's CPOTrainer uses
    gamma = gamma_beta_ratio * beta). With eps > 0 the conservative form of `dpo` is applied to the
    logit z = beta * (...) - gamma, as the SimPO reference code does.
    """
    z = beta * (_f(s_c) / _len(len_c) - _f(s_r) / _len(len_r)) - gamma
    return _conservative(z, label_smoothing)


def hinge(s_c, s_r, ref_c, ref_r, len_c=None, len_r=None, *, beta: float):
    """SLiC hinge loss (Zhao et al., 2023), TRL "hinge": loss = relu(1 - beta * Delta)."""
    rho_c, rho_r = _ratios(s_c, s_r, ref_c, ref_r)
    return jax.nn.relu(1.0 - beta * (rho_c - rho_r))


def robust(s_c, s_r, ref_c, ref_r, len_c=None, len_r=None, *, beta: float, label_smoothing: float = 0.0):
    """Robust DPO (Chowdhury et al., 2024, "Provably Robust DPO"), TRL "robust"; eps = flip rate < 0.5.

    loss = [-(1 - eps) log sigmoid(beta * Delta) + eps log sigmoid(-beta * Delta)] / (1 - 2 eps)
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    rho_c, rho_r = _ratios(s_c, s_r, ref_c, ref_r)
    z = beta * (rho_c - rho_r)
    return (-(1.0 - label_smoothing) * _ls(z) + label_smoothing * _ls(-z)) / (1.0 - 2.0 * label_smoothing)


def exo_pair(s_c, s_r, ref_c, ref_r, len_c=None, len_r=None, *, beta: float, label_smoothing: float = 0.0):
    """EXO-pref (Ji et al., 2024, eq. 16), TRL "exo_pair": reverse KL from p = (1 - eps, eps) to
    q = (sigmoid(z), sigmoid(-z)), z = beta * Delta.

    loss = sigmoid(z) (log sigmoid(z) - log(1 - eps)) + sigmoid(-z) (log sigmoid(-z) - log eps)
    eps = 0 means eps = 1e-3 (TRL's replacement and the paper's recommended value; log 0 is undefined).
    """
    eps = label_smoothing or 1e-3
    if not 0.0 < eps < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1, got {label_smoothing}")
    rho_c, rho_r = _ratios(s_c, s_r, ref_c, ref_r)
    z = beta * (rho_c - rho_r)
    return (jax.nn.sigmoid(z) * (_ls(z) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-z) * (_ls(-z) - jnp.log(eps)))


def nca_pair(s_c, s_r, ref_c, ref_r, len_c=None, len_r=None, *, beta: float):
    """NCA (Chen et al., 2024, "Noise Contrastive Alignment"), TRL "nca_pair".

    loss = -log sigmoid(beta rho_c) - 1/2 log sigmoid(-beta rho_c) - 1/2 log sigmoid(-beta rho_r)
    """
    rho_c, rho_r = _ratios(s_c, s_r, ref_c, ref_r)
    return -_ls(beta * rho_c) - 0.5 * _ls(-beta * rho_c) - 0.5 * _ls(-beta * rho_r)


def bco_pair(s_c, s_r, ref_c, ref_r, len_c=None, len_r=None, *, beta: float, running_mean: float = 0.0):
    """BCO on pairs (Jung et al., 2024, "Binary Classifier Optimization"), TRL "bco_pair".

    loss = -log sigmoid(beta rho_c - delta) - log sigmoid(-(beta rho_r - delta))
    delta = `running_mean`: TRL keeps a running mean (RunningMoments, updated with this batch *before*
    the loss) of the rewards concat(beta rho_c, beta rho_r). A pure function cannot keep that state, so
    the caller passes it (a Python float, or an array under stop_gradient); the default 0 is the form
    of the newest TRL, which dropped the running mean.
    """
    rho_c, rho_r = _ratios(s_c, s_r, ref_c, ref_r)
    return -_ls(beta * rho_c - running_mean) - _ls(-(beta * rho_r - running_mean))


def sppo_hard(s_c, s_r, ref_c, ref_r, len_c=None, len_r=None, *, beta: float):
    """SPPO with hard win probabilities (Wu et al., 2024, eq. 4.7 with P = 1 / 0), TRL "sppo_hard".

    loss = (rho_c - 1 / (2 beta))^2 + (rho_r + 1 / (2 beta))^2   (summed, not length-normalised)
    """
    rho_c, rho_r = _ratios(s_c, s_r, ref_c, ref_r)
    return (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2


def apo_zero(s_c, s_r, ref_c, ref_r, len_c=None, len_r=None, *, beta: float):
    """APO-zero (D'Oosterlinck et al., 2024, eq. 7), TRL "apo_zero": chosen up, rejected down.

    loss = 1 - sigmoid(beta rho_c) + sigmoid(beta rho_r)   (1 - sigmoid(x) computed as sigmoid(-x))
    """
    rho_c, rho_r = _ratios(s_c, s_r, ref_c, ref_r)
    return jax.nn.sigmoid(-beta * rho_c) + jax.nn.sigmoid(beta * rho_r)


def apo_down(s_c, s_r, ref_c, ref_r, len_c=None, len_r=None, *, beta: float):
    """APO-down (D'Oosterlinck et al., 2024, eq. 8), TRL "apo_down": chosen down, rejected down more.

    loss = sigmoid(beta rho_c) + 1 - sigmoid(beta Delta)
    """
    rho_c, rho_r = _ratios(s_c, s_r, ref_c, ref_r)
    return jax.nn.sigmoid(beta * rho_c) + jax.nn.sigmoid(-beta * (rho_c - rho_r))


def aot(s_c, s_r, ref_c, ref_r, len_c=None, len_r=None, *, beta: float, label_smoothing: float = 0.0):
    """AOT, paired (Melnyk et al., 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport"), TRL "aot".

    d = sort_B(s_c - s_r) - sort_B(s_ref_c - s_ref_r);  loss = -(1-eps) log sigmoid(beta d) - eps log sigmoid(-beta d)
    The sorts run over the batch, so entry i belongs to rank i, not pair i: only the mean is meaningful.
    """
    d = jnp.sort(_f(s_c) - _f(s_r), axis=0) - jnp.sort(_f(ref_c) - _f(ref_r), axis=0)
    return _conservative(beta * d, label_smoothing)


def aot_unpaired(s_c, s_r, ref_c, ref_r, len_c=None, len_r=None, *, beta: float,
                 label_smoothing: float = 0.0):
    """AOT, unpaired (Melnyk et al., 2024), TRL "aot_unpaired" (formerly "aot_pair").

    d = sort_B(rho_c) - sort_B(rho_r);  loss = -(1-eps) log sigmoid(beta d) - eps log sigmoid(-beta d)
    Batch-coupled like `aot`: entry i belongs to rank i.
    """
    rho_c, rho_r = _ratios(s_c, s_r, ref_c, ref_r)
    d = jnp.sort(rho_c, axis=0) - jnp.sort(rho_r, axis=0)
    return _conservative(beta * d, label_smoothing)


def discopop(s_c, s_r, ref_c, ref_r, len_c=None, len_r=None, *, beta: float, discopop_tau: float = 0.05):
    """DiscoPOP, the log-ratio modulated loss (Lu et al., 2024, "Discovering Preference Optimization
    Algorithms with and for Large Language Models", eq. 5), TRL "discopop".

    z = beta * Delta,  m = sigmoid(z / tau)
    loss = (1 - m) * (-log sigmoid(z)) + m * exp(-z)
    The exponential term is computed as exp(log sigmoid(z / tau) - z), finite for tau < 1 at any z.
    """
    if not discopop_tau > 0.0:
        raise ValueError(f"discopop needs discopop_tau > 0, got {discopop_tau}")
    rho_c, rho_r = _ratios(s_c, s_r, ref_c, ref_r)
    z = beta * (rho_c - rho_r)
    return -jax.nn.sigmoid(-z / discopop_tau) * _ls(z) + jnp.exp(_ls(z / discopop_tau) - z)


_LOSSES = {
    "dpo": dpo, "ln_dpo": ln_dpo, "ipo": ipo, "simpo": simpo, "hinge": hinge, "robust": robust,
    "exo_pair": exo_pair, "nca_pair": nca_pair, "bco_pair": bco_pair, "sppo_hard": sppo_hard,
    "apo_zero": apo_zero, "apo_down": apo_down, "aot": aot, "aot_unpaired": aot_unpaired,
    "discopop": discopop,
}
NAMES: tuple[str, ...] = tuple(_LOSSES)
REFERENCE_FREE: frozenset[str] = frozenset({"simpo"})
LENGTH_NORMALISED: frozenset[str] = frozenset({"ln_dpo", "ipo", "simpo"})
# Keyword hyperparameters each loss takes besides beta, read from its signature.
HYPERPARAMETERS: dict[str, dict[str, float]] = {
    name: {p.name: p.default for p in inspect.signature(fn).parameters.values()
           if p.kind is p.KEYWORD_ONLY and p.name != "beta"}
    for name, fn in _LOSSES.items()
}


def sft_nll(chosen_logps, chosen_lengths) -> Array:
    """Per-pair mean token NLL of the chosen response, -s_c / |y_c| (the RPO term of Pang et al., 2024).

    TRL's rpo_alpha term is F.cross_entropy over all chosen tokens of the batch, i.e. the batch token
    mean sum_i(-s_c,i) / sum_i |y_c,i|, added to every pair. We keep it per pair (each response weighted
    equally, independent of the batch); the two agree when all chosen lengths in the batch are equal.
    """
    return -_f(chosen_logps) / _len(chosen_lengths)


def preference_loss(name: str, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    chosen_lengths, rejected_lengths, *, beta: float, label_smoothing: float = 0.0,
                    gamma: float = 0.0, sft_weight: float = 0.0, **extra) -> Array:
    """Per-pair losses [B] of the preference loss `name` (one of NAMES), plus sft_weight * `sft_nll`.

    Log-probs are summed over each response's tokens, lengths are response token counts. Reference
    arguments may be None for the REFERENCE_FREE losses, lengths None for losses outside
    LENGTH_NORMALISED when sft_weight is 0. label_smoothing and gamma go to the losses that take them;
    a non-zero value for a loss that ignores it is an error, as is an unknown keyword in `extra`
    (HYPERPARAMETERS lists what each loss takes, e.g. discopop_tau, running_mean). All hyperparameters
    are Python floats (static under jit); only `running_mean` may also be an array.
    """
    if name not in _LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; choose one of {', '.join(NAMES)}")
    if name not in REFERENCE_FREE and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(
            f"preference loss {name!r} needs the reference log-probs (ref_chosen_logps and "
            f"ref_rejected_logps); only {', '.join(sorted(REFERENCE_FREE))} run without a reference")
    if name in LENGTH_NORMALISED and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"preference loss {name!r} normalises by length: chosen_lengths and "
                         "rejected_lengths are required")
    if sft_weight and chosen_lengths is None:
        raise ValueError("sft_weight > 0 needs chosen_lengths (the NLL is a per-token mean)")
    beta, label_smoothing, gamma, sft_weight = map(float, (beta, label_smoothing, gamma, sft_weight))
    if not beta > 0.0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if sft_weight < 0.0:
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")

    takes = HYPERPARAMETERS[name]
    unknown = sorted(set(extra) - set(takes))
    if unknown:
        raise ValueError(f"preference loss {name!r} takes no hyperparameter {', '.join(unknown)}; "
                         f"it takes beta{''.join(', ' + k for k in takes)}")
    kwargs = dict(extra)
    for key, value in (("label_smoothing", label_smoothing), ("gamma", gamma)):
        if key in takes:
            kwargs[key] = value
        elif value != 0.0:
            raise ValueError(f"{key}={value} has no effect on preference loss {name!r}")

    loss = _LOSSES[name](chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                         chosen_lengths, rejected_lengths, beta=beta, **kwargs)
    if sft_weight:
        loss = loss + sft_weight * sft_nll(chosen_logps, chosen_lengths)
    return loss


def preference_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       chosen_lengths, rejected_lengths, *, beta: float) -> dict[str, Array]:
    """Batch means under TRL's DPOTrainer metric names, so runs compare directly.

    rewards/chosen = mean(beta rho_c), rewards/rejected = mean(beta rho_r),
    rewards/accuracies = mean(1[beta rho_c > beta rho_r]) (= 1[rho_c > rho_r] for beta > 0),
    rewards/margins = mean(beta (rho_c - rho_r)), logps/chosen = mean(s_c), logps/rejected = mean(s_r),
    lengths/chosen, lengths/rejected = mean response token counts (as given, not clamped; omitted
    when the lengths are None).
    Reference-free (ref_*_logps None): the reference log-probs are taken as 0, so the rewards are
    beta * s (summed, not length-normalised).
    """
    if not float(beta) > 0.0:
        raise ValueError(f"beta must be > 0, got {beta}")
    s_c, s_r = _f(chosen_logps), _f(rejected_logps)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both reference log-probs or neither")
    if ref_chosen_logps is None:
        rho_c, rho_r = s_c, s_r
    else:
        rho_c, rho_r = _ratios(s_c, s_r, ref_chosen_logps, ref_rejected_logps)
    reward_c, reward_r = beta * rho_c, beta * rho_r
    out = {
        "rewards/chosen": jnp.mean(reward_c),
        "rewards/rejected": jnp.mean(reward_r),
        "rewards/accuracies": jnp.mean((reward_c > reward_r).astype(reward_c.dtype)),
        "rewards/margins": jnp.mean(reward_c - reward_r),
        "logps/chosen": jnp.mean(s_c),
        "logps/rejected": jnp.mean(s_r),
    }
    if chosen_lengths is not None:
        out["lengths/chosen"] = jnp.mean(_f(chosen_lengths))
    if rejected_lengths is not None:
        out["lengths/rejected"] = jnp.mean(_f(rejected_lengths))
    return out
