"""The Triton source of GPTQ's one-block column loop (``gptq_block_kernel`` launches it and
falls back to the torch loop); imported only where Triton is installed."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["rows", "n", "w_se", "w_sr", "w_sc", "s_se", "s_sr", "s_sc",
                               "h_se", "h_si", "h_sj", "qmin", "qmax"])
def gptq_block(w_ptr, s_ptr, z_ptr, h_ptr, c_ptr, err_ptr, rows, n,
               w_se, w_sr, w_sc, s_se, s_sr, s_sc, h_se, h_si, h_sj, qmin, qmax,
               ASYM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    e = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    live = r < rows
    tile = tl.load(w_ptr + e * w_se + r[:, None] * w_sr + cols[None, :] * w_sc,
                   mask=live[:, None] & (cols < n)[None, :], other=0.0)
    out = e * rows * n + r * n
    for i in range(0, n):
        wi = tl.sum(tl.where((cols == i)[None, :], tile, 0.0), axis=1)
        at = e * s_se + r * s_sr + i * s_sc
        s = tl.load(s_ptr + at, mask=live, other=1.0)
        x = tl.math.div_rn(wi, s)
        if ASYM:
            z = tl.load(z_ptr + at, mask=live, other=0.0)
            x = x + z
        # torch.round: to nearest, ties to even (exact: x − ⌊x⌋ rounds nothing)
        f = tl.floor(x)
        frac = x - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        c = tl.where((frac > 0.5) | ((frac == 0.5) & odd), f + 1.0, f)
        c = tl.minimum(tl.maximum(c, qmin), qmax)
        if ASYM:
            q = (c - z) * s
        else:
            q = c * s
        d = tl.load(h_ptr + e * h_se + i * (h_si + h_sj))
        er = tl.math.div_rn(wi - q, d)
        u = tl.load(h_ptr + e * h_se + i * h_si + cols * h_sj, mask=(cols > i) & (cols < n), other=0.0)
        tile = tile - er[:, None] * u[None, :]
        tl.store(c_ptr + out + i, c, mask=live)
        tl.store(err_ptr + out + i, er, mask=live)
