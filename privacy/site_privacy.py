"""What a site demands of everything it sends (its policy's ``[privacy]`` table): no torch, no
numpy, so a ClientApp answering a search message need not import the training stack."""

from __future__ import annotations

import math
from dataclasses import dataclass

DP_MECHANISMS = ("off", "gaussian", "laplace", "distributed")
"""What a site may be asked for: no DP, local Gaussian or Laplace noise, or its share of distributed
discrete Gaussian noise under secure aggregation (:mod:`privacy.distributed_dp`)."""
LOCAL_MECHANISMS = ("gaussian", "laplace")


@dataclass(frozen=True)
class SitePrivacy:
    """The privacy a site demands of everything it sends: the ``[privacy]`` table of its policy
    (:mod:`fedclient.policy`). Nothing in a run config or an instruction can weaken it.

    ``required``: refuse any run without local DP. ``mechanisms``: the ones it accepts.
    ``max_epsilon_per_run`` / ``max_epsilon_lifetime``: ε caps for one run and over every run the
    site's ledger ever recorded; ``max_delta``: the largest δ, and always the δ at which the
    lifetime account is kept (so the coordinator can never re-value the site's past spending at a
    large δ); ``max_clip``: the largest clip norm; ``min_noise_multiplier``: the least noise it
    adds. The ε defaults impose nothing beyond the run's own settings (a simulation's virtual
    sites); ``fedclient start`` gives a real site its policy.
    """

    required: bool = False
    mechanisms: tuple[str, ...] = ("gaussian", "laplace", "distributed")
    max_epsilon_per_run: float = math.inf
    max_epsilon_lifetime: float = math.inf
    max_delta: float = 1e-5
    max_clip: float = math.inf
    min_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        unknown = set(self.mechanisms) - set(DP_MECHANISMS[1:])
        if unknown or not self.mechanisms:
            raise ValueError(f"privacy.mechanisms must list some of {DP_MECHANISMS[1:]}, got {list(self.mechanisms)}")
        for name in ("max_epsilon_per_run", "max_epsilon_lifetime", "max_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"privacy.{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 < self.max_delta < 1:
            raise ValueError(f"privacy.max-delta must be in (0, 1), got {self.max_delta}")
        if not (self.min_noise_multiplier >= 0 and math.isfinite(self.min_noise_multiplier)):
            raise ValueError(f"privacy.min-noise-multiplier must be >= 0, got {self.min_noise_multiplier}")


__all__ = ["DP_MECHANISMS", "LOCAL_MECHANISMS", "SitePrivacy"]
