"""Bringing a sequence of K steps to T steps: Res-LSTM's sigma(t) (paper 001, section 3.1).

Its own module, light (no torch): the train stage resamples videos of unequal length with it and
the res_lstm head sub-samples with it, and a change to either must not re-run the other's
DVC stages for nothing (dvc.yaml deps are the import closure of each stage).
"""

from __future__ import annotations


def sigma(k: int, t: int) -> list[int]:
    """The paper's subset of T of the K input steps (section 3.1), 0-based:
    sigma(t) = 1 + floor((t - 1)(K - 1) / (T - 1)) for t = 1..T, minus one.

    Evenly spread, first and last step always kept; K < T repeats steps as the formula gives.
    T = 1 (the formula's 0/0) keeps the first step."""
    if k < 1 or t < 1:
        raise ValueError(f"sigma needs K >= 1 and T >= 1, got K={k}, T={t}")
    if t == 1:
        return [0]
    return [(i * (k - 1)) // (t - 1) for i in range(t)]
