"""Central differential privacy: every client's update clipped, Gaussian noise on the aggregate.

The option ``aggregation.privacy``:

- ``{"clipping": "fixed", "clipping_norm": C, "noise_multiplier": z, "seed": s}``: Flower's
  ``DifferentialPrivacyServerSideFixedClipping``. Each client's delta is scaled by
  ``min(1, C / ||delta||)``; the aggregate gets noise ``N(0, (z * C / n)^2)`` per
  coordinate, ``n`` the round's updates.
- ``{"clipping": "adaptive", "clipping_norm": C0, "noise_multiplier": z,
  "target_unclipped_quantile": 0.5, "clip_norm_lr": 0.2, "clipped_count_stddev": s_b}``:
  adaptive clipping (Andrew et al., 2021) in Flower's
  ``DifferentialPrivacyServerSideAdaptiveClipping`` loop: after clipping with ``C``, the
  noisy unclipped fraction ``b = (unclipped + N(0, s_b^2)) / n`` moves the norm,
  ``C <- C * exp(-clip_norm_lr * (b - target_unclipped_quantile))`` (the paper's rule:
  Flower's puts the clipped fraction in it, shrinking C when too many are clipped). Part
  of the privacy budget goes to the count, so the aggregate's noise multiplier is
  ``(z^-2 - (2 s_b)^-2)^-1/2``; ``s_b`` defaults to ``clients_per_round / 20``, as in
  Flower, and the defaults 0.5 and 0.2 are TensorFlow Federated's.

Two deliberate differences from Flower, neither visible without noise: the noise scale
uses the updates the round actually has (Flower uses the configured sample size, too
little noise for a round closed early by its timeout), and the clipping norm the round
clipped with (Flower's adaptive loop noises with the norm already updated for the next
round). The noise is added to the aggregated update before the session's optimizer
steps on it, which, being post-processing, keeps the guarantee for any optimizer.

Noise comes from a numpy ``Generator`` (PCG64) whose whole state is part of the
session's state: a replay of the log draws the same noise, and a checkpoint continues
the same stream. Everything here is pure: a round's draws happen on a copy of the
state, which the caller keeps only once the round has closed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core import reductions
from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.hparams import Arg, check, resolve

FIELD = "aggregation.privacy"
CLIPPING = ("fixed", "adaptive")
MAX_SEED = 2**63 - 1
MIN_CLIPPING_NORM = 1e-100
MAX_CLIPPING_NORM = 1e100
"""Every clipping norm, the adaptive loop's included, stays in this range: far beyond any
update's norm on either side, and its product with any allowed noise multiplier (the
noise's stddev) stays finite."""
MAX_NOISE_MULTIPLIER = 1e100
_COMMON = (
    Arg("clipping", "str", None, "'fixed' or 'adaptive'", choices=CLIPPING, required=True),
    Arg("noise_multiplier", "float", None, "z: noise stddev over clipping norm", required=True),
    Arg("seed", "int", None, "seed of the noise generator (null: a random one)", nullable=True),
)
FIXED_ARGS = (
    *_COMMON,
    Arg("clipping_norm", "float", None, "C: the L2 norm every update is clipped to", required=True),
)
ADAPTIVE_ARGS = (
    *_COMMON,
    Arg("clipping_norm", "float", 0.1, "the initial clipping norm"),
    Arg("target_unclipped_quantile", "float", 0.5, "fraction of updates meant to be unclipped"),
    Arg("clip_norm_lr", "float", 0.2, "learning rate of the geometric norm update"),
    Arg(
        "clipped_count_stddev",
        "float",
        None,
        "noise on the unclipped count (null: clients_per_round / 20, 0 without noise)",
        nullable=True,
    ),
)


@dataclass(frozen=True)
class PrivacySpec:
    clipping: str
    clipping_norm: float
    """Fixed: the norm; adaptive: the initial norm."""
    noise_multiplier: float
    seed: int | None = None
    target_unclipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float = 0.0
    """Resolved (never null)."""
    aggregate_noise_multiplier: float = 0.0
    """The multiplier of the aggregate's noise: z itself for fixed clipping."""

    @property
    def adaptive(self) -> bool:
        return self.clipping == "adaptive"

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "clipping": self.clipping,
            "clipping_norm": self.clipping_norm,
            "noise_multiplier": self.noise_multiplier,
            "seed": self.seed,
        }
        if self.adaptive:
            out.update(
                target_unclipped_quantile=self.target_unclipped_quantile,
                clip_norm_lr=self.clip_norm_lr,
                clipped_count_stddev=self.clipped_count_stddev,
            )
        return out


def parse_privacy(raw: Any, clients_per_round: int) -> PrivacySpec | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidHyperparameter(FIELD, f"{FIELD} must be an object, got {raw!r}", raw)
    clipping = raw.get("clipping")
    check(
        isinstance(clipping, str) and clipping in CLIPPING,
        f"{FIELD}.clipping",
        f"{FIELD}.clipping must be 'fixed' or 'adaptive', got {clipping!r}",
        clipping,
    )
    where = f"{FIELD}."
    hp = resolve(ADAPTIVE_ARGS if clipping == "adaptive" else FIXED_ARGS, raw, where=where)
    z, c, seed = hp["noise_multiplier"], hp["clipping_norm"], hp["seed"]
    # Infinite values pass torch-style range checks but make every round's release
    # non-finite: the session could never close a round again.
    check(
        0.0 <= z <= MAX_NOISE_MULTIPLIER,
        f"{where}noise_multiplier",
        f"noise_multiplier must be from 0 to {MAX_NOISE_MULTIPLIER:g}, got {z}",
        z,
    )
    check(
        MIN_CLIPPING_NORM <= c <= MAX_CLIPPING_NORM,
        f"{where}clipping_norm",
        f"clipping_norm must be from {MIN_CLIPPING_NORM:g} to {MAX_CLIPPING_NORM:g}, got {c}",
        c,
    )
    if seed is not None:
        check(0 <= seed <= MAX_SEED, f"{where}seed", f"seed must be from 0 to {MAX_SEED}", seed)
    if clipping == "fixed":
        return PrivacySpec("fixed", c, z, seed, aggregate_noise_multiplier=z)
    target, lr, count_stddev = (
        hp["target_unclipped_quantile"],
        hp["clip_norm_lr"],
        hp["clipped_count_stddev"],
    )
    check(
        0.0 <= target <= 1.0,
        f"{where}target_unclipped_quantile",
        f"target_unclipped_quantile must be in [0, 1], got {target}",
        target,
    )
    check(
        0.0 < lr < math.inf,
        f"{where}clip_norm_lr",
        f"clip_norm_lr must be finite and > 0, got {lr}",
        lr,
    )
    if count_stddev is None:
        count_stddev = clients_per_round / 20 if z > 0 else 0.0
    check(
        0.0 <= count_stddev < math.inf,
        f"{where}clipped_count_stddev",
        f"clipped_count_stddev must be finite and >= 0, got {count_stddev}",
        count_stddev,
    )
    aggregate_z = 0.0
    if z > 0:
        # The count's noise spends part of the budget (Andrew et al., Theorem 1).
        check(
            z < 2 * count_stddev,
            f"{where}clipped_count_stddev",
            f"noise_multiplier ({z}) must be below 2 * clipped_count_stddev "
            f"({2 * count_stddev}): raise clipped_count_stddev or clients_per_round",
            count_stddev,
        )
        try:
            aggregate_z = (z**-2 - (2 * count_stddev) ** -2) ** -0.5
        except (OverflowError, ZeroDivisionError):  # z**-2 beyond floats, or the two equal
            aggregate_z = math.inf
        check(
            aggregate_z <= MAX_NOISE_MULTIPLIER,
            f"{where}noise_multiplier",
            f"noise_multiplier ({z}) leaves the aggregate a noise multiplier of "
            f"{aggregate_z:g}, beyond {MAX_NOISE_MULTIPLIER:g}: lower it or raise "
            "clipped_count_stddev",
            z,
        )
    return PrivacySpec("adaptive", c, z, seed, target, lr, float(count_stddev), float(aggregate_z))


@dataclass
class PrivacyState:
    clipping_norm: float
    """The norm the next round clips to."""
    generator: dict[str, Any]
    """The noise generator's ``bit_generator.state`` (PCG64)."""
    rounds: int = 0
    """Rounds released so far."""

    def record(self) -> dict[str, Any]:
        return {
            "clipping_norm": self.clipping_norm,
            "generator": self.generator,
            "rounds": self.rounds,
        }


def start(spec: PrivacySpec) -> PrivacyState:
    seed = spec.seed if spec.seed is not None else np.random.SeedSequence().entropy
    return PrivacyState(spec.clipping_norm, dict(np.random.PCG64(seed).state))


def _generator(state: Mapping[str, Any]) -> np.random.Generator:
    bits = np.random.PCG64()
    # The setter checks the state (its bit generator's name, the integers' ranges).
    bits.state = dict(state)  # type: ignore[assignment]
    return np.random.Generator(bits)


def from_record(raw: Any) -> PrivacyState:
    """Rebuild :meth:`PrivacyState.record`'s output (from a checkpoint: checked)."""
    if not isinstance(raw, Mapping):
        raise InvalidInput("federated state: malformed privacy state", "federated")
    norm, generator, count = raw.get("clipping_norm"), raw.get("generator"), raw.get("rounds")
    if (
        isinstance(norm, bool)
        or not isinstance(norm, int | float)
        or not (math.isfinite(norm) and norm > 0)
        or not isinstance(generator, Mapping)
        or isinstance(count, bool)
        or not isinstance(count, int)
        or count < 0
    ):
        raise InvalidInput("federated state: malformed privacy state", "federated")
    try:
        state = dict(_generator(generator).bit_generator.state)
    except (TypeError, ValueError, KeyError) as exc:
        raise InvalidInput("federated state: malformed noise generator", "federated") from exc
    return PrivacyState(float(norm), state, count)


def clip(updates: Sequence[Sequence[np.ndarray]], c: float) -> tuple[list[list[np.ndarray]], int]:
    """Every update scaled to at most norm ``c`` (copies), and how many were scaled down."""
    out, clipped = [], 0
    for update in updates:
        size = reductions.total_norm(update)  # machine-independent: clipping is replayed
        scale = min(1.0, c / size) if size > 0 else 1.0
        clipped += scale < 1.0
        out.append([a * scale for a in update])
    return out, clipped


def _next_norm(c: float, exponent: float) -> float:
    """``c * exp(exponent)`` kept in the clipping norms' range: a large ``clip_norm_lr``
    would otherwise overflow ``exp`` or reach a zero norm, which clips every update to
    nothing and no checkpoint accepts. Computed in log space, so nothing overflows; inside
    the range, as Flower computes it."""
    log_norm = math.log(c) + exponent
    low, high = math.log(MIN_CLIPPING_NORM), math.log(MAX_CLIPPING_NORM)
    return (
        c * math.exp(exponent) if low < log_norm < high else math.exp(min(max(log_norm, low), high))
    )


@dataclass(frozen=True)
class Release:
    """One round's privatised aggregate and what the history reports about it."""

    aggregate: list[np.ndarray]
    record: dict[str, Any]
    state: PrivacyState
    """The state after the round (a new object: the old one is untouched)."""


def release(
    spec: PrivacySpec,
    state: PrivacyState,
    aggregate: Sequence[np.ndarray],
    clipped: int,
    n: int,
) -> Release:
    """Noise on ``aggregate`` (float64, not modified) and the next clipping norm."""
    generator = _generator(state.generator)
    c = state.clipping_norm
    record: dict[str, Any] = {"clipping_norm": c, "clipped": clipped}
    next_norm = c
    if spec.adaptive:
        # Drawn before the aggregate's noise, in Flower's order.
        unclipped = (n - clipped + float(generator.normal(0.0, spec.clipped_count_stddev))) / n
        next_norm = _next_norm(c, -spec.clip_norm_lr * (unclipped - spec.target_unclipped_quantile))
        record.update(unclipped_fraction=unclipped, next_clipping_norm=next_norm)
    stddev = spec.aggregate_noise_multiplier * c / n
    noisy = [np.asarray(a + generator.normal(0.0, stddev, a.shape)) for a in aggregate]
    record["noise_stddev"] = stddev
    after = PrivacyState(next_norm, dict(generator.bit_generator.state), state.rounds + 1)
    return Release(noisy, record, after)
