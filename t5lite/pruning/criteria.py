"""Which weights of one kernel to keep. A kernel is seen as a matrix w [K inputs, N outputs] (the
contracted axes flattened first, as `t5lite.quantization` sees it); a mask is True where a weight
is kept. Ties are broken by position (a stable sort), so the counts are exact.

  magnitude  the `sparsity` share of the smallest |w| of the whole matrix (per tensor).
  N:M        in every M consecutive inputs of each output, the N largest |w| (2:4: NVIDIA's sparse
             tensor cores; Mishra et al. 2021).
  Wanda      score |w_kn|·‖X_k‖₂ over calibration inputs X, the `sparsity` share of the lowest
             scores of each output n (Sun et al. 2023: compared per output).
"""

from __future__ import annotations

import numpy as np


def check_sparsity(sparsity: float) -> None:
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity={sparsity!r} must be in (0, 1): the share of weights removed, e.g. 0.5.")


def magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Keeps all but the round(sparsity·size) smallest |w| of the tensor."""
    check_sparsity(sparsity)
    w = np.asarray(w)
    pruned = np.argsort(np.abs(w), axis=None, kind="stable")[: round(sparsity * w.size)]
    mask = np.ones(w.size, bool)
    mask[pruned] = False
    return mask.reshape(w.shape)


def n_m_mask(scores: np.ndarray, n: int = 2, m: int = 4) -> np.ndarray:
    """scores [K, N] (|w|, or Wanda's): keeps the n highest of every m consecutive inputs (rows) of
    each output (column)."""
    scores = np.asarray(scores)
    k = scores.shape[0]
    if not 0 < n < m:
        raise ValueError(f"{n}:{m} sparsity needs 0 < N < M.")
    if k % m:
        raise ValueError(f"A kernel with {k} inputs cannot be cut into groups of {m} consecutive inputs.")
    groups = scores.reshape(k // m, m, -1)
    rank = np.argsort(np.argsort(-groups, axis=1, kind="stable"), axis=1, kind="stable")
    return (rank < n).reshape(scores.shape)


def wanda_scores(w: np.ndarray, input_norms: np.ndarray) -> np.ndarray:
    """|w_kn| · ‖X_k‖₂: a weight's share of its output, as large as its input usually is."""
    return np.abs(np.asarray(w, np.float32)) * np.asarray(input_norms, np.float32)[:, None]


def per_output_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """scores [K, N]: keeps all but the round(sparsity·K) lowest scores of each output (column)."""
    check_sparsity(sparsity)
    scores = np.asarray(scores)
    pruned = np.argsort(scores, axis=0, kind="stable")[: round(sparsity * scores.shape[0])]
    mask = np.ones(scores.shape, bool)
    np.put_along_axis(mask, pruned, False, axis=0)
    return mask


def wanda_mask(w: np.ndarray, input_norms: np.ndarray, sparsity: float) -> np.ndarray:
    """Wanda: per output, drops the `sparsity` share of inputs with the lowest |w|·‖X‖₂."""
    return per_output_mask(wanda_scores(w, input_norms), sparsity)
