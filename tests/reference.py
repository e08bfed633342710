"""An independent reference of the seed's formula, written from the design page in numpy.

float64 throughout (the worker computes in float32, as the seed does): callers compare
actions only where the top two probabilities are not within float32 noise of each other.
"""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def sum_probs(logits: np.ndarray, action: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """logits (M, B, A) -> (P (B, A), action (B,), credit (M, B)).

    The action is the argmax unless given (a sampled one, or the worker's at a near-tie).
    """
    p = softmax(np.asarray(logits, dtype=np.float64))
    total = p.sum(axis=0)
    if action is None:
        action = total.argmax(axis=-1)  # numpy, like torch, returns the first maximum
    b = np.arange(total.shape[0])
    credit = p[:, b, action] / total[b, action]
    return total, action, credit


def clear_winner(total: np.ndarray, margin: float = 1e-5) -> bool:
    """True when every environment's best action beats the second best by `margin`."""
    s = np.sort(total, axis=-1)
    if s.shape[-1] < 2:
        return True
    return bool(((s[..., -1] - s[..., -2]) > margin).all())
