r"""Privacy accounting for local DP: releases, their composition, calibration, and the site ledger.

Every message a site sends under LDP is one or more *releases* of a mechanism with a known
privacy loss. The ledger composes all of a site's releases with Google's ``dp-accounting``:
Gaussian releases exactly (they compose into one Gaussian; ε from its closed-form δ(ε)), the
others with privacy loss distributions (PLD; Meiser & Mohammadi 2018, Koskela et al. 2020), which
are tighter than RDP. Mechanisms:

* ``gaussian``: additive :math:`\mathcal N(0, (z\Delta_2)^2)` noise on an :math:`\ell_2`-clipped vector;
  parameter :math:`z` = noise standard deviation / :math:`\ell_2` sensitivity;
* ``laplace``: additive Laplace noise of scale :math:`b` on an :math:`\ell_1`-clipped vector;
  parameter :math:`b/\Delta_1` (pure :math:`\varepsilon = \Delta_1/b` per release);
* ``randomized-response``: binary randomized response, keep the true bit with probability
  :math:`1-p`, else a uniform bit; parameter :math:`p`; ``count`` bits per release.

The neighbouring relation is LDP's: *any* two datasets of the site (replace the whole dataset),
so the sensitivity of a vector clipped to norm :math:`C` is :math:`2C` (callers pass the
parameter relative to that). The ledger refuses a release that would take the site's
:math:`\varepsilon` at its :math:`\delta` above its budget.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from privacy.state_file import locked

if TYPE_CHECKING:  # dp-accounting (and the SciPy it loads) costs ~1 s: imported where it is used, so
    # a ClientApp process, started anew for every message, pays for it only when privacy is on
    from dp_accounting.pld import privacy_loss_distribution as pld

MECHANISMS = ("gaussian", "laplace", "randomized-response")
VALUE_DISCRETIZATION = 1e-4
"""PLD discretization of the privacy loss, dp-accounting's default (pessimistic: an upper bound)."""


class PrivacyBudgetExceeded(Exception):
    """A release would spend more than the site's budget; nothing was released. ``scope`` says which
    budget: ``"lifetime"`` (every run the ledger recorded) or ``"run"`` (this run's). The message
    holds the site's figures: it belongs in the site's log, not in a reply."""

    def __init__(self, message: str, scope: str = "lifetime") -> None:
        super().__init__(message)
        self.scope = scope


@dataclass(frozen=True)
class Release:
    """One application of a mechanism, ``count`` times (e.g. randomized response on ``count`` bits)."""

    mechanism: str
    parameter: float
    count: int = 1

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism '{self.mechanism}'; one of {MECHANISMS}")
        if self.count < 1:
            raise ValueError(f"a release composes at least one mechanism, got count {self.count}")
        if self.mechanism == "randomized-response":
            if not 0 < self.parameter < 1:
                raise ValueError(f"randomized response needs 0 < p < 1, got {self.parameter}")
        elif not self.parameter > 0:
            raise ValueError(f"{self.mechanism} needs a positive noise parameter, got {self.parameter}")


@functools.lru_cache(maxsize=256)
def _single(release: Release, interval: float = VALUE_DISCRETIZATION) -> pld.PrivacyLossDistribution:
    from dp_accounting.pld import privacy_loss_distribution as pld

    if release.mechanism == "gaussian":
        one = pld.from_gaussian_mechanism(release.parameter, sensitivity=1.0, value_discretization_interval=interval)
    elif release.mechanism == "laplace":
        one = pld.from_laplace_mechanism(release.parameter, sensitivity=1.0, value_discretization_interval=interval)
    else:
        one = pld.from_randomized_response(release.parameter, 2, value_discretization_interval=interval)
    return one.self_compose(release.count) if release.count > 1 else one


def composed(releases: Iterable[Release], interval: float = VALUE_DISCRETIZATION) -> pld.PrivacyLossDistribution | None:
    """The PLD of all ``releases`` in sequence (identical releases self-composed at once).
    ``interval`` is the loss discretization; coarser is faster and still an upper bound."""
    counts: dict[Release, int] = {}
    for release in releases:
        counts[release] = counts.get(release, 0) + 1
    total = None
    for release, times in sorted(counts.items(), key=lambda item: (item[0].mechanism, item[0].parameter, item[0].count)):
        part = _single(release, interval)
        part = part.self_compose(times) if times > 1 else part
        total = part if total is None else total.compose(part)
    return total


def epsilon(releases: Iterable[Release], delta: float) -> float:
    """ε at ``delta`` of the composition of ``releases`` (0 for none)."""
    counts: dict[Release, int] = {}
    for release in releases:
        counts[release] = counts.get(release, 0) + 1
    return _epsilon(tuple(sorted(counts.items(), key=lambda item: (item[0].mechanism, item[0].parameter,
                                                                    item[0].count))), delta)


@functools.lru_cache(maxsize=1024)
def _epsilon(counts: tuple[tuple[Release, int], ...], delta: float) -> float:
    gaussian = [(r, times) for r, times in counts if r.mechanism == "gaussian"]
    others = [(r, times) for r, times in counts if r.mechanism != "gaussian"]
    flips = {r.parameter for r, _ in others if r.mechanism == "randomized-response"}
    if not gaussian and len(flips) == 1 and all(r.mechanism == "randomized-response" for r, _ in others):
        return randomized_response_epsilon(flips.pop(), sum(times * r.count for r, times in others), delta)
    precision = sum(times * r.count / r.parameter**2 for r, times in gaussian)
    if not others:
        return 0.0 if not gaussian else gaussian_epsilon(1 / math.sqrt(precision), delta)
    total = composed(r for r, times in others for _ in range(times))
    if gaussian:
        from dp_accounting.pld import privacy_loss_distribution as pld

        total = total.compose(pld.from_gaussian_mechanism(1 / math.sqrt(precision), sensitivity=1.0,
                                                          value_discretization_interval=VALUE_DISCRETIZATION))
    return float(total.get_epsilon_for_delta(delta))


def randomized_response_epsilon(flip: float, bits: int, delta: float) -> float:
    r"""Exact ε at ``delta`` of ``bits``-fold binary randomized response with flip probability ``flip``.

    Each bit's privacy loss is :math:`\pm\varepsilon_0`, :math:`\varepsilon_0 = \ln((1-p/2)/(p/2))`, so
    n bits lose :math:`L = \varepsilon_0 (n - 2F)` with :math:`F \sim \mathrm{Bin}(n, p/2)` flipped
    reports, and :math:`\delta(\varepsilon) = \mathbb E[(1 - e^{\varepsilon - L})_+]` (the hockey-stick
    divergence; the same quantity dp-accounting's PLD discretizes). No discretization here.
    """
    from scipy.stats import binom

    eps0 = math.log((1 - flip / 2) / (flip / 2))
    flips = np.arange(bits + 1)
    log_mass = binom.logpmf(flips, bits, flip / 2)
    loss = eps0 * (bits - 2 * flips)

    def delta_at(eps: float) -> float:
        positive = loss > eps
        return float(np.sum(np.exp(log_mass[positive]) * -np.expm1(eps - loss[positive])))

    if delta_at(0.0) <= delta:
        return 0.0
    low, high = 0.0, eps0 * bits
    while high - low > 1e-9 * max(1.0, high):
        middle = (low + high) / 2
        low, high = (middle, high) if delta_at(middle) > delta else (low, middle)
    return high


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    r"""Exact ε at ``delta`` of one Gaussian mechanism with std/sensitivity ``noise_multiplier``.

    Gaussian privacy losses compose exactly: k releases with multipliers :math:`z_i` are one
    release with :math:`z = (\sum_i z_i^{-2})^{-1/2}`, so a Gaussian-only ledger needs one
    evaluation of the closed-form δ(ε) of Balle & Wang (ICML 2018), here dp-accounting's
    ``GaussianPrivacyLoss.get_delta_for_epsilon``, inverted by bisection (no discretization).
    """
    from dp_accounting.pld import privacy_loss_mechanism

    loss = privacy_loss_mechanism.GaussianPrivacyLoss(noise_multiplier, sensitivity=1.0)
    if loss.get_delta_for_epsilon(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while loss.get_delta_for_epsilon(high) > delta:
        low, high = high, 2 * high
    while high - low > 1e-9 * max(1.0, high):
        middle = (low + high) / 2
        low, high = (middle, high) if loss.get_delta_for_epsilon(middle) > delta else (low, middle)
    return high


def calibrate(mechanism: str, budget: float, delta: float, releases: int, count: int = 1,
              spent: Sequence[Release] = (), scope: str = "lifetime") -> float:
    """The least noisy parameter with which ``releases`` more releases (each of ``count``
    mechanisms) after ``spent`` stay within ε = ``budget`` at ``delta``. Bisection on the
    parameter (noise multiplier; for randomized response the flip probability p).
    PrivacyBudgetExceeded (with ``scope``, the budget ``budget`` is) when none fits."""
    if releases < 1:
        raise ValueError(f"calibrating needs at least one planned release, got {releases}")

    def fits(parameter: float) -> bool:
        return epsilon([*spent, *[Release(mechanism, parameter, count)] * releases], delta) <= budget

    if mechanism == "randomized-response":
        low, high = 1e-9, 1 - 1e-9  # more flipping (larger p) is more private
        if not fits(high):
            raise PrivacyBudgetExceeded(f"no randomized response fits ε = {budget} after what was spent", scope)
        while high - low > 1e-6 * high:
            middle = math.sqrt(low * high) if high / low > 4 else (low + high) / 2
            low, high = (low, middle) if fits(middle) else (middle, high)
        return high
    low, high = 1e-3, 1.0
    while not fits(high):
        low, high = high, high * 2
        if high > 1e6:
            raise PrivacyBudgetExceeded(f"no {mechanism} noise fits ε = {budget} after what was spent", scope)
    for _ in range(40):
        middle = math.sqrt(low * high)
        low, high = (low, middle) if fits(middle) else (middle, high)
        if high / low < 1 + 1e-3:
            break
    return high


@dataclass
class LedgerEntry:
    round: int
    run: str
    release: Release


@dataclass
class PrivacyLedger:
    """A site's releases and its lifetime budget; refuses a release that would exceed that budget
    or the budget of the run it belongs to.

    ``budget`` and ``delta`` are the site's lifetime ε at δ (from its own policy). Each entry names
    the run it was spent in, so a run's own spending can be capped too. Persisted by
    :class:`LedgerFile` (the site's state directory) or, in simulation without one, kept in the
    client state (:class:`StateLedger`).
    """

    budget: float
    delta: float
    entries: list[LedgerEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.budget > 0:
            raise ValueError(f"dp-epsilon must be positive, got {self.budget}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp-delta must be in (0, 1), got {self.delta}")

    @property
    def releases(self) -> list[Release]:
        return [e.release for e in self.entries]

    def run_releases(self, run: str) -> list[Release]:
        return [e.release for e in self.entries if e.run == run]

    def spent(self) -> float:
        """Lifetime ε spent so far at the ledger's δ."""
        return epsilon(self.releases, self.delta)

    def spent_after(self, new: Sequence[Release]) -> float:
        return epsilon([*self.releases, *new], self.delta)

    def spent_in_run(self, run: str, delta: float | None = None) -> float:
        """ε spent by ``run`` alone, at ``delta`` (default: the ledger's)."""
        return epsilon(self.run_releases(run), delta or self.delta)

    def check(self, run: str, new: Sequence[Release], run_budget: float = math.inf,
              run_delta: float | None = None) -> None:
        """PrivacyBudgetExceeded unless ``new`` fits both the lifetime budget and ``run``'s."""
        after = self.spent_after(new)
        if after > self.budget:
            raise PrivacyBudgetExceeded(
                f"this release would bring the site's lifetime ε to {after:.3f} > its budget {self.budget:g} "
                f"at δ = {self.delta:g} (spent so far: {self.spent():.3f})"
            )
        if math.isfinite(run_budget):
            in_run = epsilon([*self.run_releases(run), *new], run_delta or self.delta)
            if in_run > run_budget:
                raise PrivacyBudgetExceeded(
                    f"this release would bring this run's ε to {in_run:.3f} > budget {run_budget:g} at "
                    f"δ = {run_delta or self.delta:g} (spent in this run: {self.spent_in_run(run, run_delta):.3f})",
                    "run",
                )

    def charge(self, server_round: int, run: str, new: Sequence[Release], run_budget: float = math.inf,
               run_delta: float | None = None) -> float:
        """Record ``new`` and return the lifetime ε spent after it; PrivacyBudgetExceeded
        (recording nothing) if that would exceed the lifetime budget or the run's."""
        self.check(run, new, run_budget, run_delta)
        self.entries.extend(LedgerEntry(server_round, run, r) for r in new)
        return self.spent()

    # ---- persistence -------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"budget": self.budget, "delta": self.delta,
                           "entries": [{"round": e.round, "run": e.run, **asdict(e.release)} for e in self.entries]})

    @classmethod
    def from_json(cls, text: str, *, budget: float, delta: float) -> PrivacyLedger:
        """The entries of :meth:`to_json` under ``budget`` at ``delta`` (the site's policy decides
        both; the figures stored with the entries are only a record of what applied then)."""
        data = json.loads(text)
        entries = [LedgerEntry(int(e["round"]), str(e["run"]), Release(e["mechanism"], float(e["parameter"]),
                                                                        int(e["count"]))) for e in data["entries"]]
        return cls(budget, delta, entries)


class LedgerStore(Protocol):
    """Where a site's ledger lives; every change happens inside :meth:`transaction`."""

    def transaction(self) -> contextlib.AbstractContextManager[PrivacyLedger]: ...


class LedgerFile:
    """A site's ledger in a file of its state directory, across runs and restarts.

    Every read-modify-write holds the file's exclusive lock, and writes are atomic and fsync'd
    (:mod:`privacy.state_file`): two ClientApp processes charging at once both count, and a process
    killed mid-write leaves the last committed ledger, never an older one.
    """

    def __init__(self, path: str | os.PathLike, budget: float, delta: float) -> None:
        self.path = pathlib.Path(path)
        self.budget, self.delta = budget, delta

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PrivacyLedger]:
        with locked(self.path) as state:
            text = state.read_text()
            try:
                ledger = (PrivacyLedger.from_json(text, budget=self.budget, delta=self.delta) if text
                          else PrivacyLedger(self.budget, self.delta))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"privacy ledger {self.path} is unreadable ({err}); fix or move it, never delete it "
                                 "silently: it is the record of what this site has spent") from err
            count = len(ledger.entries)
            yield ledger
            if len(ledger.entries) != count:
                state.write_text(ledger.to_json())

    def read(self) -> PrivacyLedger:
        with self.transaction() as ledger:
            return ledger


class StateLedger:
    """The ledger in a client-state mapping (Flower's ``Context.state``): the fallback for
    simulations that give the virtual sites no state directory. It lasts one run."""

    def __init__(self, client_state: dict[str, Any], budget: float, delta: float) -> None:
        self.client_state, self.budget, self.delta = client_state, budget, delta

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PrivacyLedger]:
        text = self.client_state.get(LEDGER_STATE)
        ledger = (PrivacyLedger.from_json(str(text), budget=self.budget, delta=self.delta) if text
                  else PrivacyLedger(self.budget, self.delta))
        yield ledger
        self.client_state[LEDGER_STATE] = ledger.to_json()


LEDGER_STATE = "dp.ledger"
"""Client-state key of the site's ledger (JSON) when it has no state directory."""
