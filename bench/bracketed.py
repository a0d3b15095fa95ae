"""Measurements in rounds on a machine whose speed drifts: each one against the mean of the references taken just
before and just after it (the drift moves both sides), the median round kept."""
from __future__ import annotations


def bracketed_ratios(measured: list[float], references: list[float]) -> list[float]:
    """measured[n] / the mean of references[n] and references[n + 1] (one more reference than measurements)."""
    if len(references) != len(measured) + 1:
        raise ValueError(f"{len(measured)} measurements need {len(measured) + 1} references, not {len(references)}")
    return [value / ((references[n] + references[n + 1]) / 2) for n, value in enumerate(measured)]


def median_index(values: list[float]) -> int:
    """The index of the median value (the upper one of an even count)."""
    return sorted(range(len(values)), key=lambda n: values[n])[len(values) // 2]
