"""How test_batch_* compare a batched slot with its stream stepped alone: bit for bit where MLX's matmul
computes every row alone, else within float32 rounding.

MLX's CPU wheel (mlx-cpu) runs matmuls on the reference BLAS it bundles, which loops over rows: a row's
result does not depend on the other rows, so a batched slot is bit-identical to its stream alone (the
mode CI runs in). An optimized BLAS (OpenBLAS preloaded here), Accelerate or a GPU may block rows
together; then values differ in their last bits. Measured with OpenBLAS preloaded, 4 slots x 200 steps
of the tiny model through joins, leaves and rotation: every text piece and token the same, audio within
7.5e-7 of the stream alone (float32 resolves 6e-8 relative, the difference grows through ~10 layers).
So tokens and text are always compared exactly, and values within ATOL/RTOL (over 10x that margin).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

ATOL = RTOL = 1e-5


def _rows_independent() -> bool:
    rng = np.random.default_rng(1)
    w = mx.array(rng.standard_normal((192, 64)).astype(np.float32))
    x = mx.array(rng.standard_normal((16, 64)).astype(np.float32))
    batched = np.array(x @ w.T)
    return all(batched[i:i + 1].tobytes() == np.array(x[i:i + 1] @ w.T).tobytes() for i in range(16))


ROW_EXACT = _rows_independent()


def bundled_reference_blas() -> bool:
    """True when MLX's CPU matmuls run on the mlx-cpu wheel's own BLAS (nothing preloaded before it)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "blas" in line.lower()}
    return any("mlx_cpu.libs" in p for p in paths) and not any(
        "numpy.libs" not in p and "mlx_cpu.libs" not in p for p in paths)


def same(a, b) -> bool:
    """Equal bit for bit (ROW_EXACT), else within ATOL/RTOL; numpy or MLX arrays."""
    a, b = np.asarray(a), np.asarray(b)
    if ROW_EXACT:
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a.shape == b.shape and np.allclose(a, b, rtol=RTOL, atol=ATOL)
