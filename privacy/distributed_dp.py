r"""Distributed and central differential privacy on a sum of the sites' updates.

**Distributed discrete Gaussian** (Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", ICML 2021, arXiv 2102.06387). Each site
clips its summed vector to :math:`\ell_2` norm :math:`C`, scales it by the fixed point's
:math:`s` and rounds it stochastically to integers (each coordinate moves by less than 1, so the
integer vector's norm is at most :math:`sC + \sqrt d`), then adds discrete Gaussian noise
:math:`\mathcal N_{\mathbb Z}(0, \sigma_\ell^2)` per coordinate and masks the result (secure
aggregation: the coordinator only sees the sum). With

.. math:: \sigma_\ell = z\,\Delta / \sqrt t, \qquad \Delta = 2(sC + \sqrt d),

the sum over any :math:`t` honest sites carries noise of variance :math:`z^2\Delta^2` (the
:math:`t` of secure aggregation: the same sites whose shares the coordinator needs). The
neighbouring relation is local DP's (one site's whole data replaced), hence the factor 2.

*Accounting.* A discrete Gaussian of variance :math:`\sigma^2` on an integer query of
sensitivity :math:`\Delta` is :math:`\Delta^2/(2\sigma^2)`-zCDP, like the continuous one
(Canonne, Kamath, Steinke 2020). A sum of :math:`t` discrete Gaussians is not exactly one; Kairouz
et al. (Prop. 14) bound the excess by :math:`\tau = 10\sum_{k=1}^{t-1} e^{-2\pi^2\sigma_\ell^2 k/(k+1)}`.
The sites' ledgers charge the release as a Gaussian mechanism with noise multiplier :math:`z`
(:class:`~privacy.accounting.Release` ``gaussian``), the same account as the continuous Gaussian
on the sum, under the stated assumption that at least :math:`t` sites add their share honestly.
That is exact up to :math:`\tau`, which :func:`excess_tau` computes and :class:`DistributedGaussian`
refuses to exceed ``1e-12`` (it underflows to 0 for any :math:`\sigma_\ell \geq 2`; here
:math:`\sigma_\ell` is in units of :math:`1/s` and is millions).

**Central DP** (the trusted-coordinator reference): the coordinator clips each site's vector to
:math:`C` itself, sums, and adds :math:`\mathcal N(0, (2zC)^2)` per coordinate: the same noise on
the sum at the same :math:`z`, accounted the same way, with no assumption about the sites and
every assumption about the coordinator.

The discrete Gaussian sampler is Canonne-Kamath-Steinke's Algorithm 3 (a discrete Laplace proposal
of scale :math:`\lfloor\sigma\rfloor + 1`, accepted with probability
:math:`\exp(-(|Y| - \sigma^2/t)^2 / 2\sigma^2)`), vectorised; it draws from NumPy's generator seeded
by the operating system (never by a seed a message carries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from privacy.accounting import Release

MAX_EXCESS_TAU = 1e-12


def discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` independent draws of :math:`\\mathcal N_{\\mathbb Z}(0, \\sigma^2)` (int64):
    :math:`P[X = x] \\propto e^{-x^2/2\\sigma^2}`."""
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"a discrete Gaussian needs sigma > 0, got {sigma}")
    scale = math.floor(sigma) + 1
    success = -math.expm1(-1.0 / scale)  # P[geometric step ends]: 1 - e^{-1/t}
    out = np.empty(size, dtype=np.int64)
    pending = np.arange(size)
    while pending.size:
        n = pending.size
        proposal = rng.geometric(success, n).astype(np.int64) - rng.geometric(success, n).astype(np.int64)
        accept = rng.random(n) < np.exp(-((np.abs(proposal) - sigma**2 / scale) ** 2) / (2 * sigma**2))
        out[pending[accept]] = proposal[accept]
        pending = pending[~accept]
    return out


def excess_tau(sigma_local: float, sites: int) -> float:
    """Kairouz et al.'s bound on how far a sum of ``sites`` discrete Gaussians of ``sigma_local``
    is from one discrete Gaussian (added to the zCDP parameter's square root term)."""
    return 10 * sum(math.exp(-2 * math.pi**2 * sigma_local**2 * k / (k + 1)) for k in range(1, sites))


@dataclass(frozen=True)
class DistributedGaussian:
    """One site's share of the distributed discrete Gaussian (module docstring).

    ``noise_multiplier`` is :math:`z` (the ledger's Gaussian parameter: the sum's noise standard
    deviation over the sensitivity :math:`2C`), ``threshold`` the :math:`t` honest sites assumed."""

    clip: float
    noise_multiplier: float
    threshold: int

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.noise_multiplier > 0 and self.threshold >= 1):
            raise ValueError(f"distributed DP needs clip > 0, z > 0, t >= 1; got {self.clip}, "
                             f"{self.noise_multiplier}, {self.threshold}")

    def sensitivity(self, scale: float, dimension: int) -> float:
        """:math:`\\Delta = 2(sC + \\sqrt d)`: the rounded integer vector's largest change."""
        return 2 * (scale * self.clip + math.sqrt(dimension))

    def local_sigma(self, scale: float, dimension: int) -> float:
        """:math:`\\sigma_\\ell`, in integer units, of one site's share."""
        sigma = self.noise_multiplier * self.sensitivity(scale, dimension) / math.sqrt(self.threshold)
        if excess_tau(sigma, self.threshold) > MAX_EXCESS_TAU:
            raise ValueError(f"the fixed point's scale {scale:g} is too coarse for distributed DP "
                             f"(local sigma {sigma:.3g}); use more bits")
        return sigma

    def sum_std(self, scale: float, dimension: int) -> float:
        """The noise standard deviation on the sum of ``threshold`` shares, in value units."""
        return self.noise_multiplier * self.sensitivity(scale, dimension) / scale

    def noised_integers(self, vector: np.ndarray, scale: float, rng: np.random.Generator,
                        dimension: int | None = None) -> np.ndarray:
        """``vector`` (already clipped to ``clip``) scaled, rounded stochastically, plus this site's
        share; ``dimension`` is that of the whole release (every vector clipped together), which the
        sensitivity depends on (default: this vector's)."""
        x = np.asarray(vector, dtype=np.float64).reshape(-1) * scale
        rounded = np.floor(x + rng.random(x.shape)).astype(np.int64)
        sigma = self.local_sigma(scale, max(x.size, dimension or 0))
        return rounded + discrete_gaussian(sigma, x.size, rng)

    def release(self) -> Release:
        return Release("gaussian", self.noise_multiplier)


def central_noise(sums: dict[str, np.ndarray], clip: float, noise_multiplier: float,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Central DP: :math:`\\mathcal N(0, (2zC)^2)` added to every coordinate of the sums of the
    (coordinator-clipped) vectors."""
    std = 2 * noise_multiplier * clip
    return {name: total + rng.normal(0.0, std, size=np.shape(total)) for name, total in sums.items()}


__all__ = ["DistributedGaussian", "central_noise", "discrete_gaussian", "excess_tau"]
