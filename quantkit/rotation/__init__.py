"""Rotations fused into the weights (issue 20): Hadamard matrices and the streamed stream rotation."""
