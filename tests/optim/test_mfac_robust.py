"""M-FAC's Gram system made indefinite by rounding: jitter with a warning, never a crash."""

from __future__ import annotations

import pytest
import torch

from anyorder.optim.mfac import _robust_cholesky


def test_indefinite_by_rounding_gets_the_smallest_jitter_that_works() -> None:
    g = torch.randn(2, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e4
    g = torch.cat([g, g + 1e-9, g - 1e-9])  # six gradients spanning two directions: singular
    gram = g @ g.T
    scale = float(gram.diagonal().mean())
    gram -= 1e-12 * scale * torch.eye(6, dtype=torch.float64)  # rounding below the damping
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(gram)
    with pytest.warns(RuntimeWarning, match="numerically indefinite"):
        chol = _robust_cholesky(gram)
    rebuilt = chol @ chol.T
    jitter = (rebuilt - gram).diagonal()
    assert torch.allclose(jitter, jitter[0].expand(6), rtol=1e-3) and 0 < float(jitter[0])
    assert float(jitter[0]) <= 1e-2 * float(gram.diagonal().abs().mean())


def test_positive_definite_is_untouched_and_hopeless_raises() -> None:
    a = torch.eye(3, dtype=torch.float64) * 2
    torch.testing.assert_close(_robust_cholesky(a), torch.linalg.cholesky(a))
    with pytest.raises(FloatingPointError, match="not positive definite even with jitter"):
        _robust_cholesky(-torch.eye(3, dtype=torch.float64))
