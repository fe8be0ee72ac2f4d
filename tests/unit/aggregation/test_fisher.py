"""Fisher averaging against its formula."""

import numpy as np
import torch

from livar_merge.aggregation.fisher import fisher_average


def test_fisher_average_formula(rng):
    params = [torch.as_tensor(rng.normal(size=(3, 2))) for _ in range(3)]
    fishers = [torch.as_tensor(rng.exponential(size=(3, 2))) for _ in range(3)]
    fishers[1][0, 0] = 0.0
    merged = fisher_average(params, fishers, floor=1e-3).numpy()
    num = sum((f.numpy() + 1e-3) * p.numpy() for p, f in zip(params, fishers, strict=True))
    den = sum(f.numpy() + 1e-3 for f in fishers)
    np.testing.assert_allclose(merged, num / den)
