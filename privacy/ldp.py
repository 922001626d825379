r"""Local differential privacy on everything a site sends, by payload type.

:class:`LocalPrivacy` wraps any algorithm. Its client half runs the algorithm's ``local`` (or
``local_probe``), then, before anything leaves the site (and before compression, which is
post-processing), replaces the payload with a privatized one and charges the site's
:class:`~privacy.accounting.PrivacyLedger`. A release that would exceed the site's budget raises
:class:`~privacy.accounting.PrivacyBudgetExceeded` instead: nothing is sent but a refusal.

Mechanisms (the neighbouring relation is LDP's: any two datasets of the site, so a vector clipped
to norm C has sensitivity 2C):

=============================== =========================================================== ==========
payload                         mechanism                                                   accounted
=============================== =========================================================== ==========
dense update (FedAvg weights −  clip the whole update (all tensors) to ‖·‖₂ ≤ C, add           Gaussian,
global; selective-layer deltas) :math:`\mathcal N(0, \sigma^2 C^2)` per coordinate               z = σ/2
Ferret coefficients             the same on the K coefficients (coefficient space)          Gaussian
FedKSeed / one-byte scalars     the same on the vector of τ scalars (one-byte: decoded,     Gaussian
                                privatized, re-encoded); seed indices are data-independent
selective-layer layer scores    scores scaled to unit norm, :math:`\mathcal N(0, \sigma^2)` added    Gaussian
FRL rankings                    per edge, randomized response on "kept by my mask" (keep    RR on n
                                the bit w.p. 1−p, else a fair coin); the ranking sent is    bits, p
                                the reported-kept edges on top, each group in random order
=============================== =========================================================== ==========

``dp=laplace`` replaces the Gaussian rows with :math:`\ell_1` clipping and Laplace noise of scale
λC (accounted as Laplace with parameter λ/2). The FRL ranking is a post-processing of the n
randomized bits plus independent randomness, so its guarantee is exactly that of n-fold binary
randomized response (composed with the PLD accountant, not bounded by n·ε).

Noise: with ``dp-noise-multiplier`` 0 (default) each site calibrates σ (or p) so that the run's
planned releases (``dp-releases``), after what its ledger already holds, spend exactly its
budget; with a fixed σ the ledger stops the site when the next release would exceed it.

Also data-dependent, and therefore withheld under LDP: training loss and timings (metrics are
replaced by the privacy figures), and the example count (sent as 1: aggregation is unweighted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregators.base import FieldKind, Instruction, Payload, WrappedAlgorithm
from aggregators.rank_based import keep_count, pack_ranking, ranked_parameter, unpack_ranking
from aggregators.shared_randomness import OneByteCodec
from privacy.accounting import (
    LedgerFile,
    LedgerStore,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    Release,
    StateLedger,
    calibrate,
)
from privacy.refusal import PolicyRefusal
from privacy.site_privacy import DP_MECHANISMS, SitePrivacy



@dataclass(frozen=True)
class LdpSettings:
    """A site's effective LDP settings for one run: the run's, made stricter (never looser) by
    the site's :class:`SitePrivacy`. ``epsilon``/``delta`` cap the run, ``lifetime_epsilon`` at
    ``lifetime_delta`` caps everything the site's ledger holds."""

    mechanism: str
    epsilon: float
    delta: float
    clip: float
    noise_multiplier: float  # 0: calibrate to the budget
    releases: int
    run: str = ""
    lifetime_epsilon: float = math.inf
    lifetime_delta: float = 1e-5

    @classmethod
    def resolve(cls, run: Mapping[str, Any], site: SitePrivacy | None = None, run_key: str = "") -> LdpSettings:
        """Combine the run's settings (instruction config) with the site's policy: the smaller ε,
        δ and clip, the larger fixed noise multiplier. PolicyRefusal when the run asks for what
        the policy forbids (no DP at a site that requires it, a mechanism it does not accept);
        ValueError on a malformed value."""
        site = site or SitePrivacy()
        mechanism = str(run.get("dp", "off"))
        if mechanism not in DP_MECHANISMS:
            raise ValueError(f"dp must be one of {DP_MECHANISMS}, got '{mechanism}'")
        if mechanism == "off":
            if site.required:
                raise PolicyRefusal("privacy.required", "this site sends only locally private updates and the run "
                                    "asks for dp = off")
            return cls("off", math.inf, site.max_delta, site.max_clip, 0.0, 1, run_key)
        if mechanism not in site.mechanisms:
            raise PolicyRefusal("privacy.mechanisms", f"the run asks for dp = {mechanism}; this site accepts "
                                f"{', '.join(site.mechanisms)}")

        def positive(name: str, value: Any) -> float:
            number = float(value)
            if not (number > 0 and math.isfinite(number)):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
            return number

        epsilon = min(positive("dp-epsilon", run["dp-epsilon"]), site.max_epsilon_per_run)
        delta = min(positive("dp-delta", run["dp-delta"]), site.max_delta)
        clip = min(positive("clip", run["clip"]), site.max_clip)
        noise = float(run.get("dp-noise-multiplier", 0.0))
        if not (noise >= 0 and math.isfinite(noise)):
            raise ValueError(f"dp-noise-multiplier must be >= 0 (0: calibrate), got {noise}")
        if site.min_noise_multiplier:
            noise = max(noise, site.min_noise_multiplier)
        return cls(mechanism, epsilon, delta, clip, noise, max(1, int(run.get("dp-releases", 1))), run_key,
                   site.max_epsilon_lifetime, site.max_delta)

    @property
    def enabled(self) -> bool:
        return self.mechanism != "off"

    def ledger(self, path: str | None, client_state: dict[str, Any]) -> LedgerStore:
        """The site's ledger: its file when it has one (``path``), else the client state."""
        budget = self.lifetime_epsilon if math.isfinite(self.lifetime_epsilon) else 1e12
        if path:
            return LedgerFile(path, budget, self.lifetime_delta)
        return StateLedger(client_state, budget, self.lifetime_delta)


# ---- vector mechanisms ------------------------------------------------------------------------
def clip_norm(vector: np.ndarray, bound: float, order: int = 2) -> np.ndarray:
    """``vector`` scaled down (never up) to norm ≤ ``bound`` (ℓ₂ or ℓ₁)."""
    norm = float(np.linalg.norm(vector.astype(np.float64), ord=order))
    return vector if norm <= bound else vector * np.float32(bound / norm)


def noisy_vector(vector: np.ndarray, settings: LdpSettings, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Clip to ``settings.clip`` (ℓ₂ for Gaussian, ℓ₁ for Laplace), add noise of scale noise·C."""
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    scale = noise * settings.clip
    if settings.mechanism == "laplace":
        clipped = clip_norm(vector, settings.clip, order=1)
        return (clipped + rng.laplace(0.0, scale, size=clipped.shape)).astype(np.float32)
    clipped = clip_norm(vector, settings.clip)
    return (clipped + rng.normal(0.0, scale, size=clipped.shape)).astype(np.float32)


def vector_release(settings: LdpSettings, noise: float) -> Release:
    """The accounted release of :func:`noisy_vector`: sensitivity 2C, noise scale noise·C."""
    return Release("laplace" if settings.mechanism == "laplace" else "gaussian", noise / 2)


def randomized_membership(ranking: np.ndarray, keep: int, flip: float, rng: np.random.Generator) -> np.ndarray:
    """FRL's ε-LDP ranking: each edge's "kept" bit (top ``keep`` of ``ranking``) goes through binary
    randomized response with probability ``flip`` of being replaced by a fair coin; the result
    ranks reported-kept edges above the rest, each group in uniformly random order."""
    n = len(ranking)
    kept = np.zeros(n, dtype=bool)
    kept[ranking[n - keep:]] = True
    replace = rng.random(n) < flip
    reported = np.where(replace, rng.random(n) < 0.5, kept)
    ones, zeros = np.flatnonzero(reported), np.flatnonzero(~reported)
    return np.concatenate([rng.permutation(zeros), rng.permutation(ones)])


def private_evaluation(metrics: Mapping[str, float], noise_multiplier: float, loss_bound: float,
                       rng: np.random.Generator, mechanism: str = "gaussian") -> tuple[dict[str, float], Release]:
    r"""Local-DP evaluation metrics: ``v = (accuracy, min(loss, L)/L)`` lies in :math:`[0,1]^2`, so
    replacing the whole dataset moves it by at most :math:`\sqrt 2` in :math:`\ell_2` and 2 in
    :math:`\ell_1`. Gaussian: each coordinate gets :math:`\mathcal N(0, (z\sqrt 2)^2)`; Laplace:
    :math:`\mathrm{Lap}(2z)`; the result is clamped back to :math:`[0,1]` (post-processing). Returns
    the noisy loss and accuracy and the release to charge (``mechanism``, parameter z). One site's
    noisy figure is nearly useless on its own (σ ≈ 5.7 at z = 4); the unweighted mean over many
    sites is what carries signal."""
    if mechanism == "gaussian":
        def noise() -> float:
            return float(rng.normal(0.0, noise_multiplier * math.sqrt(2.0)))
    elif mechanism == "laplace":
        def noise() -> float:
            return float(rng.laplace(0.0, noise_multiplier * 2.0))
    else:
        raise ValueError(f"noised evaluation uses gaussian or laplace noise, not '{mechanism}'")
    accuracy = float(np.clip(float(metrics["accuracy"]) + noise(), 0.0, 1.0))
    loss = min(float(metrics["loss"]), loss_bound) / loss_bound
    loss = float(np.clip(loss + noise(), 0.0, 1.0)) * loss_bound
    return {"loss": loss, "accuracy": accuracy}, Release(mechanism, noise_multiplier)


# ---- the wrapper ------------------------------------------------------------------------------
class LocalPrivacy(WrappedAlgorithm):
    """``inner`` with its client half's every payload privatized and accounted (module docstring).
    The server half is the inner algorithm's, unchanged.

    ``site`` is the site's own privacy policy, ``ledger_path`` its ledger file (None: the client
    state) and ``run`` the key its spending is recorded under (the ClientApp passes Flower's run id,
    which the coordinator cannot vary from one message to the next).
    """

    def __init__(self, inner, site: SitePrivacy | None = None, ledger_path: str | None = None,
                 run: str = "") -> None:
        super().__init__(inner)
        self.site, self.ledger_path, self.run = site or SitePrivacy(), ledger_path, run

    # client half
    def local(self, model, data, instruction, client_state) -> Payload:
        return self._private(self.inner.local, model, data, instruction, client_state)

    def local_probe(self, model, data, instruction, client_state) -> Payload:
        return self._private(self.inner.local_probe, model, data, instruction, client_state)

    def _private(self, run, model, data, instruction: Instruction, client_state: dict[str, Any]) -> Payload:
        settings = LdpSettings.resolve(instruction.config, self.site, self.run)
        if not settings.enabled:
            return run(model, data, instruction, client_state)
        store = settings.ledger(self.ledger_path, client_state)
        server_round = int(instruction.config.get("server-round", instruction.config.get("round", 0)))
        with store.transaction() as ledger:  # refuse before training
            own = ledger.run_releases(settings.run)[-1:]
            last = own or ledger.releases[-1:]  # a new run: another release like the site's last one
            if last:
                try:  # the run's own budget only once it has spent some (its calibration fits it then)
                    ledger.check(settings.run, last, settings.epsilon if own else math.inf, settings.delta)
                except PrivacyBudgetExceeded as err:
                    raise PrivacyBudgetExceeded(f"privacy budget spent: another release like the last one "
                                                f"would exceed it ({err})", err.scope) from None
        payload = run(model, data, instruction, client_state)
        rng = np.random.default_rng()  # the noise must be unpredictable: never seeded
        with store.transaction() as ledger:  # charged under the lock, before anything is sent
            arrays, releases, figures = self.privatize(
                payload, instruction, settings, ledger, rng,
                shapes={k: tuple(p.shape) for k, p in model.named_parameters()}, client_state=client_state,
            )
            ledger.charge(server_round, settings.run, releases, settings.epsilon, settings.delta)
            spent = ledger.spent_in_run(settings.run, settings.delta)
        metrics = {k: v for k, v in payload.metrics.items() if k in self.public_metrics}
        # this run's spending only: what the site spent for other runs or coordinators stays local
        metrics.update({"dp-epsilon-spent": spent, "dp-epsilon-budget": settings.epsilon, "dp-delta": settings.delta,
                        "dp-clip": settings.clip, **figures})
        return Payload(arrays, 1, metrics)

    def privatize(
        self,
        payload: Payload,
        instruction: Instruction,
        settings: LdpSettings,
        ledger: PrivacyLedger,
        rng: np.random.Generator,
        *,
        shapes: Mapping[str, tuple[int, ...]],
        client_state: dict[str, Any],
    ) -> tuple[dict[str, np.ndarray], list[Release], dict[str, float]]:
        """The privatized arrays, the releases they cost, and the noise figures to report.
        ``shapes`` are the model's parameter shapes (which arrays are dense tensors)."""
        arrays = dict(payload.arrays)
        releases: list[Release] = []
        figures: dict[str, float] = {}
        kinds = {key: self.payload_kind(key, shapes) for key in arrays}
        unknown = sorted(key for key, kind in kinds.items() if kind is None)
        if unknown:
            raise ValueError(f"no local DP mechanism for payload arrays {unknown}; refusing to send them")

        def of_kind(kind: FieldKind) -> list[str]:
            return sorted(key for key, k in kinds.items() if k is kind)

        def gaussian_or_laplace(vector: np.ndarray) -> np.ndarray:
            sigma = settings.noise_multiplier or 2 * calibrated_parameter(
                client_state, settings, ledger, vector_release(settings, 1.0).mechanism, 1)
            releases.append(vector_release(settings, sigma))
            figures["dp-noise-multiplier"] = sigma
            return noisy_vector(vector, settings, sigma, rng)

        dense = of_kind(FieldKind.MODEL_UPDATE)
        if dense:  # one vector: every tensor of the update clipped together
            base = {k: (np.asarray(instruction.arrays[k], dtype=np.float32) if self.update_kind == "weights"
                        else np.float32(0)) for k in dense}
            flat = np.concatenate([(np.asarray(arrays[k], dtype=np.float32) - base[k]).reshape(-1) for k in dense])
            noisy, offset = gaussian_or_laplace(flat), 0
            for key in dense:
                size = int(np.prod(shapes[key]))
                arrays[key] = (noisy[offset: offset + size].reshape(shapes[key]) + base[key]).astype(np.float32)
                offset += size
        for key in of_kind(FieldKind.SUMMED) + of_kind(FieldKind.SCALARS):
            arrays[key] = gaussian_or_laplace(arrays[key])
        for key in of_kind(FieldKind.ONE_BYTE_CODES):
            codec = OneByteCodec(float(instruction.config["one-byte-low"]), float(instruction.config["one-byte-high"]))
            arrays[key] = codec.encode(gaussian_or_laplace(codec.decode(arrays[key])))
        for key in of_kind(FieldKind.LAYER_SCORES):
            scores = np.asarray(arrays[key], dtype=np.float32)
            norm = float(np.linalg.norm(scores))
            unit = (scores / norm if norm > 0 else scores).reshape(-1) * np.float32(settings.clip)
            noisy = gaussian_or_laplace(unit) / np.float32(settings.clip)
            arrays[key] = np.abs(noisy).reshape(scores.shape).astype(np.float32)  # scores are magnitudes
        rank_keys = of_kind(FieldKind.RANKING)
        if rank_keys:
            sparsity = float(instruction.config["frl-sparsity"])
            sizes = {k: int(np.prod(shapes[ranked_parameter(k)])) for k in rank_keys}
            total = sum(sizes.values())
            flip = calibrated_parameter(client_state, settings, ledger, "randomized-response", total)
            for key in rank_keys:
                ranking = unpack_ranking(np.asarray(arrays[key], dtype=np.uint8), sizes[key])
                noisy_ranking = randomized_membership(ranking, keep_count(sizes[key], sparsity), flip, rng)
                arrays[key] = pack_ranking(noisy_ranking, sizes[key])
            releases.append(Release("randomized-response", flip, total))
            figures["dp-flip-probability"] = flip
        # FieldKind.PUBLIC_INDEX (drawn from a seed, not from the data) passes unchanged
        return arrays, releases, figures


CALIBRATED_PREFIX = "dp.calibrated/"


def calibrated_parameter(client_state: dict[str, Any], settings: LdpSettings, ledger: PrivacyLedger, mechanism: str,
                count: int) -> float:
    """The noise parameter for this run's releases of ``mechanism`` (× ``count``), calibrated once
    per run so that the planned releases spend the run's budget, after what the run already spent,
    without taking the site's lifetime spending past its lifetime budget (the noisier of the two)."""
    key = f"{CALIBRATED_PREFIX}{settings.run}/{mechanism}/{count}/{settings.epsilon}/{settings.delta}"
    if key not in client_state:
        parameter = calibrate(mechanism, settings.epsilon, settings.delta, settings.releases, count,
                              spent=ledger.run_releases(settings.run), scope="run")
        if math.isfinite(settings.lifetime_epsilon):
            parameter = max(parameter, calibrate(mechanism, ledger.budget, ledger.delta, settings.releases, count,
                                                 spent=ledger.releases))
        client_state[key] = parameter
    return float(client_state[key])


__all__ = ["LdpSettings", "LocalPrivacy", "SitePrivacy", "calibrated_parameter", "clip_norm", "noisy_vector", "private_evaluation",
           "randomized_membership"]
