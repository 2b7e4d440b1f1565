"""Statistics the experiments report: rates with Wilson or Jeffreys intervals, Newcombe differences of two
rates, percentile bootstrap intervals (and means with them; over seeds and questions for trained models), and
Spearman rank correlation."""
import math

import numpy as np


def rate(k, n, confidence=0.95, method="wilson"):
    """k of n with a Wilson interval, or a Jeffreys one (method="jeffreys": the equal-tailed interval of
    Beta(k + 1/2, n - k + 1/2), its ends set to 0 at k = 0 and 1 at k = n; what Palisade reports)."""
    from scipy.stats import beta, binomtest
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci": [None, None], "method": method}
    if method == "jeffreys":
        tail = (1 - confidence) / 2
        low = 0.0 if k == 0 else float(beta.ppf(tail, k + 0.5, n - k + 0.5))
        high = 1.0 if k == n else float(beta.ppf(1 - tail, k + 0.5, n - k + 0.5))
    else:
        interval = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
        low, high = float(interval.low), float(interval.high)
    return {"k": int(k), "n": int(n), "rate": k / n, "ci": [low, high], "method": method}


def bootstrap_ci(statistic, *samples, n_boot=2000, seed=0, confidence=0.95):
    """Percentile bootstrap interval of statistic(*samples), each sample resampled independently
    (paired samples: pass them as one 2-D array with rows as units)."""
    rng = np.random.default_rng(seed)
    samples = [np.asarray(s) for s in samples]
    values = []
    for _ in range(n_boot):
        resampled = [s[rng.integers(0, len(s), len(s))] for s in samples]
        values.append(statistic(*resampled))
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    alpha = (1 - confidence) / 2
    if len(values) == 0:
        return [None, None]
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def mean_ci(values, seed=0):
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return {"mean": None, "ci": [None, None], "n": 0}
    return {"mean": float(values.mean()), "ci": bootstrap_ci(np.mean, values, seed=seed), "n": len(values)}


def rate_difference(a, b, confidence=0.95):
    """Difference of two rates (lists of 0/1) with Newcombe's hybrid score interval, built from the two
    Wilson intervals: unlike a bootstrap it does not collapse to [0, 0] when both rates are 0/n."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return {"diff": None, "ci": [None, None], "method": "newcombe"}
    ra, rb = rate(a.sum(), len(a), confidence), rate(b.sum(), len(b), confidence)
    (pa, (la, ua)), (pb, (lb, ub)) = (ra["rate"], ra["ci"]), (rb["rate"], rb["ci"])
    diff = pa - pb
    return {"diff": diff, "ci": [diff - math.hypot(pa - la, ub - pb), diff + math.hypot(ua - pa, pb - lb)],
            "method": "newcombe"}


def spearman(x, y, seed=0):
    """Spearman's rho with a bootstrap interval over the (x, y) pairs."""
    from scipy.stats import spearmanr
    pairs = np.column_stack([x, y]).astype(float)
    rho = float(spearmanr(pairs[:, 0], pairs[:, 1]).statistic)
    ci = bootstrap_ci(lambda p: spearmanr(p[:, 0], p[:, 1]).statistic, pairs, seed=seed)
    return {"rho": rho, "ci": ci, "n": len(pairs)}


def seeds_questions_ci(values, statistic=np.mean, n_boot=2000, seed=0, confidence=0.95):
    """A figure measured per (training seed, question): statistic over all of it, with a percentile interval
    from resampling the seeds and the questions (crossed: both axes drawn with replacement, the same questions
    for every seed, as they were measured). values: an array [seeds, questions, ...] or a tuple of such arrays
    that statistic takes together (e.g. numerator and denominator of a ratio). Also: the figure of each seed
    alone, with its interval over questions, and in how many seeds that interval excludes 0 on the figure's side."""
    arrays = [np.asarray(v, dtype=float) for v in (values if isinstance(values, tuple) else (values,))]

    def interval(parts, resample_seeds):
        rng = np.random.default_rng(seed)
        n_seeds, n_questions = parts[0].shape[:2]
        draws = []
        for _ in range(n_boot):
            seeds = rng.integers(0, n_seeds, n_seeds) if resample_seeds else np.arange(n_seeds)
            questions = rng.integers(0, n_questions, n_questions)
            draws.append(statistic(*[a[seeds][:, questions] for a in parts]))
        draws = np.asarray(draws, dtype=float)
        draws = draws[np.isfinite(draws)]
        alpha = (1 - confidence) / 2
        return [float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))] if len(draws) else [None] * 2

    value = float(statistic(*arrays))
    per_seed = [{"value": float(statistic(*[a[s:s + 1] for a in arrays])),
                 "ci": interval([a[s:s + 1] for a in arrays], resample_seeds=False)} for s in range(len(arrays[0]))]
    side = np.sign(value)
    holds = sum(1 for p in per_seed if p["ci"][0] is not None and side != 0
                and (p["ci"][0] > 0 if side > 0 else p["ci"][1] < 0))
    return {"value": value, "ci": interval(arrays, resample_seeds=True), "n_seeds": len(arrays[0]),
            "n_questions": int(arrays[0].shape[1]), "per_seed": per_seed,
            "seeds_excluding_0": f"{holds} of {len(arrays[0])}",
            "interval": "percentile bootstrap, seeds and questions resampled (crossed)"}
