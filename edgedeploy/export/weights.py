"""Weights with realistic magnitudes for the parity proof when the user gives none.

A freshly initialised classifier has BatchNorm running stats (0, 1) and a final Linear drawn from N(0, 0.01):
its logits are ~0, and ~0 matches anything within atol. We re-initialise (documented in docs/EXPORT.md):
BatchNorm statistics and affine parameters are drawn around realistic values (so BN folding is exercised),
then the layer producing the output is scaled until the first output has std >= `target_std`.
"""

from __future__ import annotations

import numpy as np


def reinitialise_for_parity(model, sample: np.ndarray, seed: int = 0, target_std: float = 2.0) -> dict[str, float]:
    """Re-initialise `model` in place; returns the output std before and after."""
    import torch
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(sample))

    def first_output_std() -> float:
        with torch.no_grad():
            out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return float(out.float().std())

    before = first_output_std()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) * 0.8 + 0.6)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
        last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        after = first_output_std()
        if last and 0 < after < target_std:
            scale = target_std / after
            last[-1].weight.mul_(scale)
            if last[-1].bias is not None:
                last[-1].bias.mul_(scale)
            after = first_output_std()
    return {"output_std_before": before, "output_std_after": after}
