"""Score drift: the bundle's reference distribution of the ensemble score and the PSI against it.

A model bundle carries the distribution of the triage ensemble's score on its validation split
(:class:`ScoreReference`, the ``score_reference`` key of ``manifest.json``): bin edges at the
deciles of the validation scores and the count of validation images in each bin. The node
compares the scores of the images it analysed in a recent window with it by the Population
Stability Index (:func:`psi`). Pure functions of their inputs: reading the window from the
database and logging are :mod:`spine_node.monitoring`'s job.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Proportion used for an empty bin in the PSI (the logarithm of 0 is undefined).
PSI_EPSILON = 1e-4
#: Default number of quantile bins of a reference (deciles, as is usual for the PSI).
DEFAULT_BINS = 10


@dataclass(frozen=True)
class ScoreReference:
    """Distribution of the ensemble score on a bundle's validation split, as bins and counts.

    Bin ``i`` holds scores ``s`` with ``bin_edges[i] <= s < bin_edges[i + 1]``; the last bin
    also holds ``bin_edges[-1]`` (the convention of :func:`numpy.histogram`).

    Attributes
    ----------
    bin_edges : tuple of float
        ``k + 1`` strictly increasing edges, the first 0.0 and the last 1.0.
    counts : tuple of int
        ``k`` counts of validation images per bin (not all zero).
    source : str
        Which images the counts come from (for example "validation split, fold 0").
    positive_rate : float or None
        Fraction of those images at or above the bundle's threshold, when known.

    Raises
    ------
    TypeError
        A count that is not an int.
    ValueError
        Edges not increasing from 0 to 1, counts of the wrong length, negative or all zero,
        a positive rate outside [0, 1].
    """

    bin_edges: tuple[float, ...]
    counts: tuple[int, ...]
    source: str = ""
    positive_rate: float | None = None

    def __post_init__(self) -> None:
        edges = tuple(float(e) for e in self.bin_edges)
        object.__setattr__(self, "bin_edges", edges)
        object.__setattr__(self, "counts", tuple(self.counts))
        if len(edges) < 2 or edges[0] != 0.0 or edges[-1] != 1.0:
            raise ValueError(f"bin_edges must run from 0.0 to 1.0, got {edges!r}")
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError(f"bin_edges must be strictly increasing, got {edges!r}")
        for count in self.counts:
            if isinstance(count, bool) or not isinstance(count, int):
                raise TypeError(f"counts must be ints, got {count!r}")
        if len(self.counts) != len(edges) - 1:
            raise ValueError(
                f"counts must have one entry per bin ({len(edges) - 1}), got {len(self.counts)}"
            )
        if any(c < 0 for c in self.counts) or sum(self.counts) == 0:
            raise ValueError(f"counts must be >= 0 and not all 0, got {self.counts!r}")
        if self.positive_rate is not None and not 0.0 <= self.positive_rate <= 1.0:
            raise ValueError(f"positive_rate must be in [0, 1], got {self.positive_rate!r}")

    @property
    def n(self) -> int:
        """How many validation images the reference counts."""
        return sum(self.counts)

    def proportions(self) -> np.ndarray:
        """Fraction of the validation images in each bin, shape ``(k,)``."""
        return np.asarray(self.counts, dtype=np.float64) / self.n

    def to_json(self) -> dict[str, Any]:
        """The ``score_reference`` object of ``manifest.json``."""
        return {
            "statistic": "triage ensemble score",
            "bin_edges": list(self.bin_edges),
            "counts": list(self.counts),
            "n": self.n,
            "source": self.source,
            "positive_rate": self.positive_rate,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> ScoreReference:
        """Read the ``score_reference`` object of ``manifest.json``.

        Raises
        ------
        KeyError
            When ``bin_edges`` or ``counts`` is missing.
        TypeError, ValueError
            As the constructor, or when ``n`` disagrees with the counts.
        """
        rate = document.get("positive_rate")
        ref = cls(
            bin_edges=tuple(document["bin_edges"]),
            counts=tuple(document["counts"]),
            source=str(document.get("source", "")),
            positive_rate=None if rate is None else float(rate),
        )
        if "n" in document and document["n"] != ref.n:
            raise ValueError(f"score_reference n {document['n']!r} differs from its counts {ref.n}")
        return ref


def _scores(scores: Sequence[float] | np.ndarray, argument: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError(f"{argument} is empty")
    if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
        raise ValueError(f"{argument} must be finite scores in [0, 1]")
    return values


def score_reference(
    scores: Sequence[float] | np.ndarray,
    *,
    n_bins: int = DEFAULT_BINS,
    threshold: float | None = None,
    source: str = "",
) -> ScoreReference:
    """Build the reference distribution from validation scores: quantile bins and counts.

    Interior edges are the ``1/n_bins, ..., (n_bins-1)/n_bins`` quantiles of ``scores``
    (so each bin holds about the same share of validation images, the usual binning of the
    PSI); equal quantiles (many tied scores) merge into one edge.

    Parameters
    ----------
    scores : array_like
        Ensemble scores of the validation images, in [0, 1].
    n_bins : int
        Number of quantile bins (at least 2).
    threshold : float, optional
        The bundle's decision threshold: records the validation positive rate.
    source : str
        Which images these are, recorded in the manifest.

    Returns
    -------
    ScoreReference

    Raises
    ------
    ValueError
        Empty scores, scores outside [0, 1], ``n_bins`` below 2.
    """
    values = _scores(scores, "scores")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
        raise ValueError(f"n_bins must be an int >= 2, got {n_bins!r}")
    inner = np.quantile(values, np.arange(1, n_bins) / n_bins)
    edges = np.unique(np.concatenate([[0.0], inner, [1.0]]))
    edges = edges[(edges >= 0.0) & (edges <= 1.0)]
    counts, _ = np.histogram(values, bins=edges)
    rate = None if threshold is None else float(np.mean(values >= threshold))
    return ScoreReference(
        bin_edges=tuple(float(e) for e in edges),
        counts=tuple(int(c) for c in counts),
        source=source,
        positive_rate=rate,
    )


def window_counts(reference: ScoreReference, scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Count ``scores`` in the reference's bins, shape ``(k,)`` (ints)."""
    counts, _ = np.histogram(_scores(scores, "scores"), bins=np.asarray(reference.bin_edges))
    return counts.astype(np.int64)


def psi(
    reference: ScoreReference,
    scores: Sequence[float] | np.ndarray,
    *,
    epsilon: float = PSI_EPSILON,
) -> float:
    """Population Stability Index of ``scores`` against the reference's bins.

    ``PSI = sum_i (a_i - e_i) * ln(a_i / e_i)``, with ``e_i`` the reference's (expected)
    proportion and ``a_i`` the window's (actual) proportion in bin ``i``; a proportion of 0
    is replaced by ``epsilon``. It is the symmetrised Kullback-Leibler divergence of the two
    binned distributions. Usual reading (Siddiqi 2006): below 0.1 no significant change,
    0.1 to 0.25 a moderate shift, above 0.25 a significant shift.

    References: B. Yurdakul, "Statistical Properties of Population Stability Index",
    dissertation, Western Michigan University, 2018 (section 2, definition and thresholds);
    N. Siddiqi, *Credit Risk Scorecards*, Wiley, 2006, ch. 8.

    Parameters
    ----------
    reference : ScoreReference
        Expected distribution (the bundle's validation scores).
    scores : array_like
        Scores of the window, in [0, 1].
    epsilon : float
        Stand-in for an empty bin's proportion.

    Returns
    -------
    float
        The PSI (>= 0; 0 when the binned distributions are equal).

    Raises
    ------
    ValueError
        Empty scores, scores outside [0, 1], ``epsilon`` not in (0, 1).
    """
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon!r}")
    actual = window_counts(reference, scores).astype(np.float64)
    actual /= actual.sum()
    expected = reference.proportions()
    a = np.where(actual > 0, actual, epsilon)
    e = np.where(expected > 0, expected, epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


class DriftState(str, enum.Enum):
    """What a drift check concluded."""

    NO_REFERENCE = "no_reference"  # the bundle carries no score_reference
    TOO_FEW_IMAGES = "too_few_images"  # fewer scored images in the window than the minimum
    OK = "ok"  # PSI at or below the threshold
    DRIFT = "drift"  # PSI above the threshold


@dataclass(frozen=True)
class DriftCheck:
    """One comparison of a window of scores with the reference.

    Attributes
    ----------
    state : DriftState
        The conclusion.
    psi : float or None
        The PSI (None unless computed: no reference, too few images).
    n_window : int
        Scored images (positive or negative) in the window.
    threshold : float
        The configured drift threshold on the PSI.
    """

    state: DriftState
    psi: float | None
    n_window: int
    threshold: float

    @property
    def drifted(self) -> bool:
        """True when the PSI passed the threshold."""
        return self.state is DriftState.DRIFT

    def describe(self) -> str:
        """One line for the page and the log."""
        if self.state is DriftState.NO_REFERENCE:
            return "no reference: the model bundle carries no validation score distribution"
        if self.state is DriftState.TOO_FEW_IMAGES:
            return f"too few scored images in the window ({self.n_window})"
        verdict = "above" if self.drifted else "at or below"
        return (
            f"PSI {self.psi or 0.0:.3f} over {self.n_window} images, {verdict} the threshold "
            f"{self.threshold:g}"
        )


def check_drift(
    reference: ScoreReference | None,
    scores: Sequence[float] | np.ndarray,
    *,
    threshold: float,
    min_images: int,
) -> DriftCheck:
    """Compare the window's ``scores`` with ``reference`` (see :func:`psi`).

    Parameters
    ----------
    reference : ScoreReference or None
        The bundle's reference (None: "no reference").
    scores : array_like
        Ensemble scores of the images analysed in the window.
    threshold : float
        PSI above which the scores are said to have drifted (> 0).
    min_images : int
        Fewer scored images than this give "too few images" (no PSI).

    Raises
    ------
    ValueError
        ``threshold`` not positive, ``min_images`` below 1.
    """
    if not (isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    if min_images < 1:
        raise ValueError(f"min_images must be >= 1, got {min_images!r}")
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = int(values.size)
    if reference is None:
        return DriftCheck(DriftState.NO_REFERENCE, None, n, threshold)
    if n < min_images:
        return DriftCheck(DriftState.TOO_FEW_IMAGES, None, n, threshold)
    value = psi(reference, values)
    state = DriftState.DRIFT if value > threshold else DriftState.OK
    return DriftCheck(state, value, n, threshold)
