"""compare.py: how the Python side of the tests measures values against a reference
(the counterpart of tests/compare.h).

A comparison that is false for NaN skips the bad value: max() keeps its first argument
when the other is NaN, so `max(abs(x - y) for ...)` passes a run that went NaN. Each
measure here looks for NaN and inf first, in either operand, and returns an infinite
difference with the index of the first one, so that no tolerance passes it.
Standard library only.
"""
import math


def first_nonfinite(a, b):
    """Index of the first NaN or inf in a or b (compared element by element), or None."""
    # a sum is non-finite exactly when an element is (floats summed in double cannot
    # overflow), and summing is fast; the index is searched only when there is one
    if math.isfinite(sum(a)) and math.isfinite(sum(b)):
        return None
    return next(i for i, (x, y) in enumerate(zip(a, b)) if not (math.isfinite(x) and math.isfinite(y)))


def rel_diff(a, b):
    """(max |a - b| / max |b|, index of the first NaN or inf or None) for a tensor a
    against its reference b; the difference is inf where a NaN or inf was found."""
    if len(a) != len(b):
        raise ValueError(f"lengths differ: {len(a)} vs {len(b)}")
    bad = first_nonfinite(a, b)
    if bad is not None:
        return math.inf, bad
    if a == b:
        return 0.0, None
    scale = max(abs(y) for y in b) or 1.0
    return max(abs(x - y) for x, y in zip(a, b)) / scale, None


def max_rel_diff_each(a, b):
    """max over i of |a[i] - b[i]| / |a[i]| (each value relative to itself, as for losses);
    inf where a NaN or inf was found, or where the lengths differ."""
    if len(a) != len(b) or first_nonfinite(a, b) is not None:
        return math.inf
    return max((abs(x - y) / abs(x) for x, y in zip(a, b)), default=0.0)
