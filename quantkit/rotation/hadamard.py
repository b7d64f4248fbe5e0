"""Randomized Hadamard matrices of the sizes real models have.

A Hadamard rotation spreads every input channel over all of them, so a few outlier
channels no longer set a whole group's scale (QuaRot, SpinQuant). Sizes are rarely powers of
two (SmolLM2's 576 = 36·16, Qwen2's 896 = 28·32, 5120 = 20·256), so the matrix is the
Kronecker product of a Sylvester power of two and one Paley matrix: Paley I gives order
q + 1 for a prime q ≡ 3 (mod 4), Paley II order 2(q + 1) for a prime q ≡ 1 (mod 4). Random
signs on the rows make it a random member of a family that still multiplies in O(n²).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j − i)``, χ the quadratic character mod the prime ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).unsqueeze(0) - torch.arange(q).unsqueeze(1)) % q
    return chi[idx]


def _paley(order: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of ``order`` by Paley's constructions, or None."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return s + torch.eye(order, dtype=torch.float64)
    if order % 2 == 0:
        q = order // 2 - 1
        if _is_prime(q) and q % 4 == 1:
            c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
            a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix ``[n, n]`` (float64), or None when no construction here has that order."""
    power = n & -n
    odd = n // power
    if odd == 1:
        return _sylvester(n)
    core = odd
    while core <= n:
        h = _paley(core)
        if h is not None:
            return torch.kron(_sylvester(n // core), h)
        core *= 2
    return None


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """An orthogonal ``[n, n]`` float64 matrix: ``diag(±1) · H / √n`` with random signs; a
    random orthogonal matrix (logged) for the rare sizes no construction here reaches."""
    h = hadamard(n)
    if h is None:
        from ..graph.rotate import random_orthogonal

        log.info("no Hadamard matrix of order %d is constructed here; using a random orthogonal one", n)
        return random_orthogonal(n, generator)
    signs = torch.randint(0, 2, (n, 1), generator=generator, dtype=torch.int64).to(torch.float64) * 2 - 1
    return signs * h / n ** 0.5
