"""Teacher balancing: standardise each teacher's features before the distillation loss.

Teachers' activations differ by orders of magnitude (PHI-S, Ranzinger et al., 2024, arXiv
2410.01680, Figure 1), so an unweighted sum of their losses is dominated by one. Three choices,
each an invertible affine map ``y = (x - mu) @ W`` estimated once from the teacher's own
features (the adaptor heads learn ``y``; :meth:`Balancer.inverse` maps a prediction back):

* ``"phi-s"`` (PHI Standardisation, the paper's eq. 11-13): with the covariance
  ``Sigma = U diag(lambda) U^T`` and a normalised Hadamard matrix ``H`` (``H H^T = I``, entries
  ``+-1/sqrt(C)``), ``y = (1 / alpha) H U^T (x - mu)`` with ``alpha = sqrt(mean(lambda))``. The
  rotation spreads the variance evenly, so every dimension of ``y`` has variance 1, using one
  scale for all dimensions (isotropic); the spectrum is kept, only scaled by ``1/alpha^2``.
* ``"standardize"``: per channel, ``(x - mu) / sigma`` (Theia, UNIC).
* ``"none"``: the identity.

Hadamard matrices come from Sylvester's construction (``scipy.linalg.hadamard``, orders
``2^k``) times Paley's construction I (order ``q + 1`` for a prime ``q = 3 mod 4``: 4, 8, 12, 20,
24, 32, 44, 48, ...) by a Kronecker product, which covers every width of the zoo (96 = 12 x 8,
192 = 12 x 16, 768 = 12 x 64, 1024, 1152 = 12 x 96, 1280 = 20 x 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import hadamard as sylvester

BALANCING = ("phi-s", "standardize", "none")


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def paley(q: int) -> np.ndarray:
    """Paley construction I: a Hadamard matrix of order ``q + 1`` (``q`` prime, ``q % 4 == 3``),
    entries +-1: ``I + [[0, 1^T], [-1, Q]]`` with ``Q[i, j]`` the Legendre symbol of ``j - i``."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley construction I needs a prime q = 3 mod 4, got {q}")
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)])
    idx = np.arange(q)
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:], s[1:, 0] = 1, -1
    s[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % q]
    return s + np.eye(q + 1, dtype=np.int64)


def hadamard(n: int) -> np.ndarray:
    """A normalised Hadamard matrix of order ``n`` (``H @ H.T == I``, entries +-1/sqrt(n)).

    Raises:
        ValueError: no Sylvester x Paley construction of order ``n`` (names ``n``).
    """
    two = n & -n  # the largest power of two dividing n
    for p in [1] + [q + 1 for q in range(3, n, 4) if _is_prime(q)]:
        if p > n or n % p or (n // p) & (n // p - 1):
            continue
        base = np.ones((1, 1), dtype=np.int64) if p == 1 else paley(p - 1)
        h = np.kron(base, sylvester(n // p))
        return h / np.sqrt(n)
    raise ValueError(
        f"no Hadamard matrix of order {n} from Sylvester x Paley (power of two {two}); "
        "use balancing 'standardize' for this width"
    )


@dataclass
class Balancer:
    """An affine standardisation ``y = (x - mean) @ weight`` of one teacher's features.

    Attributes:
        kind: one of :data:`BALANCING`.
        mean: ``(C,)``.
        weight: ``(C, C)``.
    """

    kind: str
    mean: torch.Tensor
    weight: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., C)`` to the balanced space."""
        return (x - self.mean) @ self.weight

    def inverse(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inverse (C, C), offset (C,))`` with ``x = y @ inverse + offset``."""
        inv = torch.linalg.inv(self.weight.double()).to(self.weight.dtype)
        return inv, self.mean.clone()


def fit_balancer(x: torch.Tensor, kind: str) -> Balancer:
    """Estimate the balancing ``kind`` from samples ``x`` ``(N, C)`` of a teacher's features."""
    if kind not in BALANCING:
        raise ValueError(f"unknown balancing {kind!r}; expected one of {BALANCING}")
    x = x.double()
    c = x.shape[1]
    mean = x.mean(0)
    if kind == "none":
        return Balancer(kind, torch.zeros(c), torch.eye(c))
    xc = x - mean
    cov = xc.T @ xc / max(1, x.shape[0] - 1)
    if kind == "standardize":
        weight = torch.diag(1.0 / cov.diagonal().clamp_min(1e-12).sqrt())
    else:
        eigvals, u = torch.linalg.eigh(cov)  # cov = u diag(eigvals) u^T
        alpha = eigvals.clamp_min(0).mean().clamp_min(1e-24).sqrt()
        h = torch.from_numpy(hadamard(c))
        weight = (h @ u.T).T / alpha  # y = x @ weight = (1/alpha) H U^T x, rows as samples
    return Balancer(kind, mean.float(), weight.float())
