"""Quality measures shared by evaluation, label and teacher fitting (pure numpy/torch).

Fidelity is top-1 agreement with the ensemble; KL is the mean over rows of KL(p_ens || softmax(z))
at T = 1, in nats; ECE (Guo et al. 2017) uses 15 equal-width confidence bins over labelled rows:
sum_b |B_b|/n * |accuracy(B_b) - confidence(B_b)|.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def accuracy(pred: np.ndarray, y: np.ndarray) -> float | None:
    """Top-1 accuracy over the labelled rows (y >= 0); None when none is labelled."""
    keep = y >= 0
    return float((pred[keep] == y[keep]).mean()) if keep.any() else None


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float | None:
    """ECE over the labelled rows; bin b holds confidences in (b/bins, (b+1)/bins]."""
    keep = y >= 0
    if not keep.any():
        return None
    probs, y = probs[keep], y[keep]
    conf, correct = probs.max(1), probs.argmax(1) == y
    index = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    return float(sum(abs(correct[index == b].mean() - conf[index == b].mean()) * (index == b).sum()
                     for b in range(bins) if (index == b).any()) / len(y))


def mean_kl(target: np.ndarray, logits: np.ndarray) -> float:
    """Mean over rows of KL(target || softmax(logits)), nats (0 log 0 = 0)."""
    return float(F.kl_div(F.log_softmax(torch.from_numpy(logits).float(), -1), torch.from_numpy(target).float(),
                          reduction="batchmean"))
