"""Running Hessian ``H = 2/n Σ x xᵀ`` of a Linear's inputs, as GPTQ needs it.

One accumulator serves every Linear of an input group (q/k/v; gate/up): they read the same
tensor, so the Hessian is gathered once and shared.
"""

from __future__ import annotations

import torch

from ..distributed import World
from ..errors import CalibrationError


class HessianAccumulator:
    """Accumulates ``2/n Σ x xᵀ`` in float32 with one matmul per batch.

    The running mean is rescaled per batch (as in the GPTQ reference) so the magnitude of
    ``H`` does not grow with the number of tokens. Token counts are host integers taken from
    shapes, so ``add`` never synchronises with the device.

    On CUDA, bf16/fp16 inputs are multiplied as they are with float32 accumulation and output
    (``out_dtype``): their products are exact in float32, so this loses nothing against
    upcasting first, and runs on the tensor cores instead of float32 CUDA cores (about 15x
    faster on an H100, where this matmul is most of the calibration cost), and the running mean's
    rescale and sum happen in the same call (``benchmarks/hessian_accumulate.py``).
    """

    def __init__(self, name: str = "", in_features: int | None = None) -> None:
        self.name, self.in_features = name, in_features
        self.tokens = 0
        self.calls = 0
        self._h: torch.Tensor | None = None
        # The one rank whose solves read this Hessian (None: every rank's may): the reduce
        # sends it there alone and the other ranks drop theirs; a MoE expert's, the engine
        # feeds on that rank alone, with every rank's tokens, and never reduces.
        self.owner: int | None = None
        self._elsewhere = False

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Fold in a batch of inputs ``[tokens, in_features]``; with ``y`` (the same tokens from
        another stream) the cross term ``2/n Σ x yᵀ`` instead."""
        y = x if y is None else y
        t = x.shape[0]
        if t == 0:
            return
        self.calls += 1
        if self._h is None:
            self._h = torch.zeros(x.shape[1], x.shape[1], device=x.device, dtype=torch.float32)
        n = self.tokens
        self.tokens = n + t
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            # The rescale and the sum in the product's epilogue: no [in, in] temporary and two
            # passes over the accumulator fewer than a product, a scale and an add.
            torch.addmm(self._h, x.T, y.to(x.dtype), beta=n / self.tokens, alpha=2.0 / self.tokens,
                        out_dtype=torch.float32, out=self._h)
        else:
            self._h.addmm_(x.T.to(torch.float32), y.to(torch.float32), beta=n / self.tokens, alpha=2.0 / self.tokens)

    def reduce(self, world: World) -> None:
        """The Hessian of every rank's tokens: each rank's mean weighted by its token count,
        summed (as sums plus counts), divided by the total count; on ``owner`` alone when set."""
        if world.size == 1:
            return
        if self._h is None:  # none of this rank's tokens reached it (an expert no token picked)
            if self.in_features is None:
                raise CalibrationError(f"rank {world.rank}: no calibration tokens reached {self.name or 'this module'}",
                                       hint="use at least as many calibration batches as ranks")
            self._h = torch.zeros(self.in_features, self.in_features, device=world.device, dtype=torch.float32)
        count = world.all_reduce(torch.tensor([float(self.tokens)], dtype=torch.float64, device=self._h.device))
        self._h.mul_(self.tokens)
        if self.owner is None:
            world.all_reduce(self._h)
        else:
            world.reduce_to(self._h, self.owner)
            if world.rank != self.owner:
                self._h, self._elsewhere = None, True
        self.tokens = int(count.item())
        if self._elsewhere:
            return
        if self.tokens:
            self._h.div_(self.tokens)
        else:
            self._h = None  # no rank saw a token: hessian() says so

    def hessian(self) -> torch.Tensor:
        if self._elsewhere:
            raise RuntimeError(f"{self.name}: this Hessian was reduced to rank {self.owner}, which solves with it")
        if self._h is None:
            raise CalibrationError(f"no calibration tokens reached {self.name or 'this module'}",
                                   file=self.name or None, hint="check the calibration set is not empty")
        return self._h
