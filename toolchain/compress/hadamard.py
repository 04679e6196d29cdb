"""Hadamard matrices (±1 entries, H Hᵀ = n I) of the orders this project rotates residual streams by.

Constructions, each exact in integers:
  Sylvester     H_{2n} = [[H, H], [H, -H]]: every power of two.
  Paley I       q prime, q ≡ 3 (mod 4): order q + 1 (12, 20, 24, 32, 44, 48, ...).
  Paley II      q prime, q ≡ 1 (mod 4): order 2 (q + 1) (28, 36, 60, 76, ...).
  Kronecker     H_a ⊗ H_b is Hadamard of order a·b, since (A ⊗ B)(A ⊗ B)ᵀ = AAᵀ ⊗ BBᵀ = ab I.
A width n is written as k · 2^m with k an order one Paley construction gives (or 1); widths with no such
factorisation (every n that is not 1, 2 or a multiple of 4, and some multiples of 4) have none here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _legendre_table(q: int) -> torch.Tensor:
    """χ(a) for a = 0..q-1: 0 at 0, +1 on the nonzero squares mod q, -1 elsewhere."""
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[sorted({(x * x) % q for x in range(1, q)})] = 1
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i). Since χ(-1) = -1 for q ≡ 3 (mod 4) Q is antisymmetric, for q ≡ 1 symmetric;
    in both cases Q Qᵀ = q I - J and Q J = 0, which is what makes the Paley matrices Hadamard."""
    index = torch.arange(q)
    return _legendre_table(q)[(index[None, :] - index[:, None]) % q]


def sylvester(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def paley1(q: int) -> torch.Tensor:
    """Order q + 1: H = I + S with S = [[0, 1ᵀ], [-1, Q]] skew-symmetric and S Sᵀ = q I, so
    H Hᵀ = I + S + Sᵀ + S Sᵀ = (q + 1) I."""
    if not (is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q ≡ 3 mod 4, got {q}")
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.int64)


def paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1): the symmetric conference matrix C = [[0, 1ᵀ], [1, Q]] (C Cᵀ = q I) with every 0
    replaced by [[1, -1], [-1, -1]] and every ±1 by ±[[1, 1], [1, -1]]; the two blocks are orthogonal
    to each other and each has norm 2 per row, which turns C Cᵀ = q I into H Hᵀ = 2 (q + 1) I."""
    if not (is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q ≡ 1 mod 4, got {q}")
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    zero = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    one = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    return torch.kron(c, one) + torch.kron((c == 0).to(torch.int64), zero)


@dataclass(frozen=True)
class Construction:
    """H_k ⊗ H_{2^m}: `k` from `base` (sylvester when k is 1), `power` = 2^m from Sylvester."""

    base: str  # "sylvester" | "paley1" | "paley2"
    k: int
    power: int

    @property
    def order(self) -> int:
        return self.k * self.power

    def describe(self) -> str:
        if self.base == "sylvester":
            return f"sylvester({self.order})"
        q = self.k - 1 if self.base == "paley1" else self.k // 2 - 1
        return f"{self.base}(q={q}, order {self.k}) x sylvester({self.power})"

    def matrix(self) -> torch.Tensor:
        """The ±1 Hadamard matrix (int64)."""
        if self.base == "sylvester":
            return sylvester(self.order)
        base = paley1(self.k - 1) if self.base == "paley1" else paley2(self.k // 2 - 1)
        return torch.kron(base, sylvester(self.power))


def _paley_base(k: int) -> str | None:
    if k % 4 == 0 and is_prime(k - 1) and (k - 1) % 4 == 3:
        return "paley1"
    if k % 4 == 0 and is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def construction(n: int) -> Construction | None:
    """How to build a Hadamard matrix of order `n` here, or None. Takes the smallest Paley factor k
    (largest power of two), the cheapest matrix to build."""
    if n >= 1 and not n & (n - 1):
        return Construction("sylvester", 1, n)
    power = n & -n  # the largest power of two dividing n
    while power >= 1:
        k = n // power
        base = _paley_base(k)
        if base is not None:
            return Construction(base, k, power)
        power //= 2
    return None
