"""FREE's adaptive exit threshold: a Beta mixture fitted online to (confidence, agree) pairs."""

from __future__ import annotations

import math


class ExitThreshold:
    """``exit_threshold``, moved by a Beta mixture fitted online to (confidence, agree) pairs.

    Every deep pass tells, for each stacked position and for the token that stopped the
    stack, whether the shallow head's argmax equals the deep model's: a labelled pair
    (c, agree) at no extra cost. The confidences of agreeing and disagreeing positions
    are each modelled as a Beta distribution (fitted by moments: mean m, variance v give
    a = m * s, b = (1 - m) * s with s = m (1 - m) / v - 1), mixed with weight pi = the
    share of agreeing pairs. The threshold becomes the smallest confidence c (on a grid
    of 0.01) from which on the posterior

        P(agree | c) = pi Beta(c; a1, b1) / (pi Beta(c; a1, b1) + (1 - pi) Beta(c; a0, b0))

    stays at or above ``agree_posterior`` up to 1, floored at 0.5 (below it the argmax is
    not even a majority) and 1.0 when no such c exists (then nothing exits, but the pair of
    every non-exiting token still comes in, so the fit can recover).

    Start value: the ``exit_threshold`` option (0.9). Update rule: statistics decay by
    ``decay`` per pair (a memory of about 500 pairs, so the threshold follows the
    workload), and the threshold is refitted every ``refit_every`` pairs once there are
    ``min_pairs`` of them with at least 3 of each kind.

    Example: agreeing confidences around 0.9 (mean 0.9, var 0.004), disagreeing around
    0.4 (mean 0.4, var 0.02), pi = 0.7, agree_posterior 0.9: the posterior is 0.60 at
    c = 0.7 and 0.91 at 0.75, so tokens with shallow confidence from 0.75 on exit.
    """

    GRID = [i / 100 for i in range(50, 101)]
    FLOOR = 0.5

    def __init__(self, start: float, adaptive: bool = True, agree_posterior: float = 0.9,
                 min_pairs: int = 32, refit_every: int = 8, decay: float = 0.998):
        self.value = start
        self.adaptive = adaptive
        self.agree_posterior = agree_posterior
        self.min_pairs = min_pairs
        self.refit_every = refit_every
        self.decay = decay
        # per class (0: disagree, 1: agree): weighted count, sum of c, sum of c^2
        self._n = [0.0, 0.0]
        self._s1 = [0.0, 0.0]
        self._s2 = [0.0, 0.0]
        self._seen = 0
        self.pairs = 0  # pairs observed in all
        self.agreements = 0

    def observe(self, confidence: float, agree: bool) -> None:
        self.pairs += 1
        self.agreements += bool(agree)
        if not self.adaptive:
            return
        c = min(max(float(confidence), 1e-4), 1 - 1e-4)
        for k in (0, 1):
            self._n[k] *= self.decay
            self._s1[k] *= self.decay
            self._s2[k] *= self.decay
        k = int(bool(agree))
        self._n[k] += 1
        self._s1[k] += c
        self._s2[k] += c * c
        self._seen += 1
        if self._seen >= self.min_pairs and self._seen % self.refit_every == 0 and min(self._n) >= 3:
            self.value = self.fit()

    @staticmethod
    def beta_moments(mean: float, var: float) -> tuple[float, float]:
        var = max(var, 1e-6)
        spread = max(mean * (1 - mean) / var - 1, 1e-3)
        return mean * spread, (1 - mean) * spread

    @staticmethod
    def log_beta_pdf(c: float, a: float, b: float) -> float:
        return (a - 1) * math.log(c) + (b - 1) * math.log(1 - c) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))

    def posterior(self, c: float) -> float:
        """P(agree | confidence c) under the current fit."""
        pi = self._n[1] / (self._n[0] + self._n[1])
        log_p = []
        for k, weight in ((0, 1 - pi), (1, pi)):
            mean = self._s1[k] / self._n[k]
            a, b = self.beta_moments(mean, self._s2[k] / self._n[k] - mean * mean)
            log_p.append(math.log(max(weight, 1e-12)) + self.log_beta_pdf(min(max(c, 1e-4), 1 - 1e-4), a, b))
        return 1 / (1 + math.exp(min(log_p[0] - log_p[1], 700)))

    def fit(self) -> float:
        threshold = 1.0
        for c in reversed(self.GRID):
            if self.posterior(c) < self.agree_posterior:
                break
            threshold = c
        return max(threshold, self.FLOOR)
