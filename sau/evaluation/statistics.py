"""Intervals and paired tests for the rates sau reports (evaluation protocol: seeds, intervals, paired tests).

Sections:
    intervals        Wilson interval on a count, percentile bootstrap over prompts
    tests            exact McNemar test on the discordant pairs of two methods
    summaries        a rate over unlearning seeds (mean, pooled Wilson interval, raw counts), a paired comparison

Everything is exact or seeded: the same inputs give the same numbers on every machine. No scipy (not a
dependency): the binomial tail is summed exactly with integers and the normal quantile comes from the
standard library.
"""
import math
from fractions import Fraction
from statistics import NormalDist  # the standard library's module: absolute imports never find this file

import numpy as np


def _z(confidence):
    """The two-sided normal quantile of a confidence level (1.959964 for 0.95)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf((1 + confidence) / 2)


def _check_count(successes, n):
    if n < 0 or successes < 0 or successes > n or int(successes) != successes or int(n) != n:
        raise ValueError(f"a count needs whole numbers 0 <= successes <= n, got {successes} of {n}")


# ----------------------------------------------------------------------------------------------------
# Intervals

def wilson_interval(successes, n, confidence=0.95):
    """(low, high): the Wilson score interval of a binomial proportion successes / n.

    Wilson rather than the normal (Wald) interval: the rates sau reports sit near 0 (a removed backdoor) or 1
    (an intact one), where Wald collapses to a zero-width interval at 0/n and Wilson stays honest (0/200 still
    allows up to 1.9%). With n = 0 nothing is known: (0, 1)."""
    _check_count(successes, n)
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # the exact ends are 0 at 0/n and 1 at n/n; rounding must not push them past
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def bootstrap_interval(values, statistic=np.mean, samples=2000, confidence=0.95, seed=0):
    """(low, high): the percentile bootstrap interval of statistic(values), resampling the values (one per prompt)
    with replacement `samples` times from a numpy generator seeded with `seed`, so the interval is a fixed
    function of its inputs. For per-prompt scores (a detector's continuous score, a per-prompt success) where
    no closed form applies."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("bootstrap_interval needs a non-empty 1-d sequence of values")
    if samples < 1:
        raise ValueError(f"bootstrap_interval needs at least one resample, got {samples}")
    _z(confidence)  # the same check of the level as the other intervals
    rows = np.random.default_rng(seed).integers(0, len(values), (samples, len(values)))
    estimates = np.array([statistic(values[row]) for row in rows], dtype=np.float64)
    tail = (1 - confidence) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    return float(low), float(high)


# ----------------------------------------------------------------------------------------------------
# Tests

def mcnemar_exact(only_a, only_b):
    """Two-sided exact McNemar p-value from the discordant pairs: only_a items succeed under A alone, only_b
    under B alone. Under the null each discordant pair falls either way with probability 1/2, so the p-value is
    twice the smaller binomial(only_a + only_b, 1/2) tail, capped at 1; with no discordant pair, 1.

    Exact rather than the chi-square approximation: sau's discordant counts are a handful (SAU 2/200 against
    UCE 5/200), far below where the approximation holds. The tail is summed in integers (math.comb) and
    divided once, so the value is exact before the final conversion to float."""
    if min(only_a, only_b) < 0 or int(only_a) != only_a or int(only_b) != only_b:
        raise ValueError(f"discordant counts must be whole numbers >= 0, got {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


# ----------------------------------------------------------------------------------------------------
# Summaries

def _outcomes(values, name):
    array = np.asarray(values)
    if array.ndim != 1 or not (array.dtype == bool or np.isin(array, (0, 1)).all()):
        raise ValueError(f"{name} must be a 1-d sequence of booleans (one per prompt)")
    return array.astype(bool)


def rate_over_seeds(successes, trials, confidence=0.95):
    """A rate measured once per unlearning seed, summarised for a table and results.json:
    rate        mean over seeds of the per-seed rates (what the table shows)
    low, high   the Wilson interval on the pooled count sum(successes) / sum(trials)
    pooled      that pooled rate (equal to `rate` when every seed has as many trials)
    per_seed    each seed's rate; successes, trials: the raw per-seed counts, kept so any other summary can be
                recomputed from results.json.

    Pooling counts over seeds treats every (prompt, seed) image as an independent trial; the same prompts recur
    under each seed, so the interval is somewhat narrow when seeds disagree: `per_seed` shows whether they do."""
    successes, trials = [int(s) for s in successes], [int(t) for t in trials]
    if len(successes) != len(trials):
        raise ValueError(f"{len(successes)} success counts for {len(trials)} trial counts: one of each per seed")
    if not trials:
        raise ValueError("a rate over seeds needs at least one seed")
    for s, t in zip(successes, trials):
        _check_count(s, t)
        if t == 0:
            raise ValueError("every seed needs at least one trial")
    per_seed = [s / t for s, t in zip(successes, trials)]
    low, high = wilson_interval(sum(successes), sum(trials), confidence)
    return {"rate": sum(per_seed) / len(per_seed), "low": low, "high": high,
            "pooled": sum(successes) / sum(trials), "seeds": len(trials), "confidence": confidence,
            "per_seed": per_seed, "successes": successes, "trials": trials}


def rate_from_outcomes(outcomes_per_seed, confidence=0.95):
    """rate_over_seeds from per-prompt booleans, one list per seed (evaluate_defense's result["per_prompt"])."""
    outcomes = [_outcomes(seed, "each seed's outcomes") for seed in outcomes_per_seed]
    return rate_over_seeds([int(o.sum()) for o in outcomes], [len(o) for o in outcomes], confidence)


def paired_comparison(outcomes_a, outcomes_b):
    """Two methods on the same prompts and seeds: per-prompt booleans (the target showed, say), concatenated over
    seeds in the same order for both. Returns the four cells of the paired table and the exact McNemar p-value:
    only_a, only_b   items where one method alone succeeded (the discordant pairs the test reads)
    both, neither    the concordant items, which carry no evidence about the difference
    rate_a, rate_b   each method's rate; n the number of pairs; p_value mcnemar_exact(only_a, only_b).

    Paired because both methods meet the same prompt and seed: the test asks whether their disagreements lean one
    way, which is far more sensitive than comparing two independent intervals."""
    a, b = _outcomes(outcomes_a, "outcomes_a"), _outcomes(outcomes_b, "outcomes_b")
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need the same prompts and seeds: {len(a)} against {len(b)}")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return {"n": len(a), "only_a": only_a, "only_b": only_b, "both": int((a & b).sum()),
            "neither": int((~a & ~b).sum()), "rate_a": float(a.mean()) if len(a) else None,
            "rate_b": float(b.mean()) if len(b) else None, "p_value": mcnemar_exact(only_a, only_b)}
