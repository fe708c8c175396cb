import functools, torch, triton
import triton.language as tl
from .nf4_words import _prmt_table

@functools.lru_cache(maxsize=4)
def pair_asm(dtype):
    """PTX: two int32 words ($8 = a, $9 = b) -> eight 32-bit registers $0..$7, register s holding
    the codes of nibble s of a (low half) and of b (high half)."""
    th0, th1, th2, th3, tl0, tl1, tl2, tl3 = (f"0x{v:08x}" for v in _prmt_table(dtype))
    quarter = """
    {sel}
    and.b32 s, s, 0x7777;
    shr.b32 b, s4, 1;
    and.b32 b, b, 0x4444;
    or.b32 b, b, 0x3210;
    prmt.b32 ha, {th0}, {th1}, s;
    prmt.b32 hb, {th2}, {th3}, s;
    prmt.b32 hi, ha, hb, b;
    prmt.b32 la, {tl0}, {tl1}, s;
    prmt.b32 lb, {tl2}, {tl3}, s;
    prmt.b32 lo, la, lb, b;
    prmt.b32 {o0}, lo, hi, 0x6240;
    prmt.b32 {o1}, lo, hi, 0x7351;
    """
    t = dict(th0=th0, th1=th1, th2=th2, th3=th3, tl0=tl0, tl1=tl1, tl2=tl2, tl3=tl3)
    body = "prmt.b32 t0, $8, $9, 0x5140;\nprmt.b32 t1, $8, $9, 0x7362;\n"
    body += quarter.format(sel="mov.b32 s, t0;\nmov.b32 s4, t0;", o0="$0", o1="$1", **t)
    body += quarter.format(sel="shr.b32 s, t0, 16;\nmov.b32 s4, s;", o0="$2", o1="$3", **t)
    body += quarter.format(sel="mov.b32 s, t1;\nmov.b32 s4, t1;", o0="$4", o1="$5", **t)
    body += quarter.format(sel="shr.b32 s, t1, 16;\nmov.b32 s4, s;", o0="$6", o1="$7", **t)
    return "{\n.reg .b32 t0, t1, s, s4, b, ha, hb, hi, la, lb, lo;\n" + body + "}"

@functools.lru_cache(maxsize=8)
def half_asm(dtype, half):
    """PTX for one 64-block: nibbles 4h .. 4h+3 of words $4 (a), $5 (b) -> $0..$3 (code pairs)."""
    th0, th1, th2, th3, tl0, tl1, tl2, tl3 = (f"0x{v:08x}" for v in _prmt_table(dtype))
    quarter = """
    {sel}
    and.b32 s, s, 0x7777;
    shr.b32 b, s4, 1;
    and.b32 b, b, 0x4444;
    or.b32 b, b, 0x3210;
    prmt.b32 ha, {th0}, {th1}, s;
    prmt.b32 hb, {th2}, {th3}, s;
    prmt.b32 hi, ha, hb, b;
    prmt.b32 la, {tl0}, {tl1}, s;
    prmt.b32 lb, {tl2}, {tl3}, s;
    prmt.b32 lo, la, lb, b;
    prmt.b32 {o0}, lo, hi, 0x6240;
    prmt.b32 {o1}, lo, hi, 0x7351;
    """
    t = dict(th0=th0, th1=th1, th2=th2, th3=th3, tl0=tl0, tl1=tl1, tl2=tl2, tl3=tl3)
    body = "prmt.b32 t0, $4, $5, %s;\n" % ("0x5140" if half == 0 else "0x7362")
    body += quarter.format(sel="mov.b32 s, t0;\nmov.b32 s4, t0;", o0="$0", o1="$1", **t)
    body += quarter.format(sel="shr.b32 s, t0, 16;\nmov.b32 s4, s;", o0="$2", o1="$3", **t)
    return "{\n.reg .b32 t0, s, s4, b, ha, hb, hi, la, lb, lo;\n" + body + "}"

@functools.lru_cache(maxsize=8)
def half_asm_regs(dtype, half):
    th0, th1, th2, th3, tl0, tl1, tl2, tl3 = (f"0x{v:08x}" for v in _prmt_table(dtype))
    a = half_asm(dtype, half)
    return a.replace(f"prmt.b32 ha, {th0}, {th1}", f"prmt.b32 ha, $6, {th1}").replace(
        f"prmt.b32 hb, {th2}, {th3}", f"prmt.b32 hb, $8, {th3}").replace(
        f"prmt.b32 la, {tl0}, {tl1}", f"prmt.b32 la, $10, {tl1}").replace(
        f"prmt.b32 lb, {tl2}, {tl3}", f"prmt.b32 lb, $12, {tl3}")

@triton.jit
def _codes_half_regs(w, t0, t1, t2, t3, asm: tl.constexpr, ty: tl.constexpr):
    i16 = tl.int16
    c0, c1, c2, c3 = tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [w, t0, t1, t2, t3],
                                               dtype=(i16, i16, i16, i16), is_pure=True, pack=2)
    return c0.to(ty, bitcast=True), c1.to(ty, bitcast=True), c2.to(ty, bitcast=True), c3.to(ty, bitcast=True)

@triton.jit
def _codes_half(w, asm: tl.constexpr, ty: tl.constexpr):
    i16 = tl.int16
    c0, c1, c2, c3 = tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r,r", [w], dtype=(i16, i16, i16, i16), is_pure=True, pack=2)
    return c0.to(ty, bitcast=True), c1.to(ty, bitcast=True), c2.to(ty, bitcast=True), c3.to(ty, bitcast=True)

@triton.jit
def _codes2(w, asm: tl.constexpr, ty: tl.constexpr):
    i16 = tl.int16
    c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
        asm, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [w], dtype=(i16, i16, i16, i16, i16, i16, i16, i16), is_pure=True, pack=2)
    return (c0.to(ty, bitcast=True), c1.to(ty, bitcast=True), c2.to(ty, bitcast=True), c3.to(ty, bitcast=True),
            c4.to(ty, bitcast=True), c5.to(ty, bitcast=True), c6.to(ty, bitcast=True), c7.to(ty, bitcast=True))

@triton.jit
def _cat4(a, b, c, d, BLOCK_N: tl.constexpr):
    # [BLOCK_N, 16] x 4 -> [BLOCK_N, 64], column 16 j + r from tile j
    t = tl.join(tl.join(a, c), tl.join(b, d))  # [BLOCK_N, 16, 2(b/d), 2(a/c)] -> index j = 2*i0 + i1? see below
    t = tl.permute(t, (0, 2, 3, 1))  # [BLOCK_N, i_inner, i_outer, 16]: column 32 i_inner + 16 i_outer + r
    return tl.reshape(t, (BLOCK_N, 64))

@triton.jit
def _epilogue(acc, out_ptr, ws_ptr, lock_ptr, offs_m, offs_n, m_mask, n_mask, M, N, pid_m, pid_n, pid_s,
              SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    out_mask = n_mask[:, None] & m_mask[None, :]
    o_off = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    if SPLIT_K > 1:
        tl.store(ws_ptr + pid_s.to(tl.int64) * M * N + o_off, acc, mask=out_mask)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        done = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for si in tl.static_range(SPLIT_K):
                acc += tl.load(ws_ptr + si * M * N + o_off, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)
    else:
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def words_kernel_v2(
    x_ptr, w_ptr, absmax_ptr, code_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr, M, N, groups_per_split, G,
    stride_xm, stride_xk, stride_w, stride_am,
    asm: tl.constexpr, asm_lo: tl.constexpr, asm_hi: tl.constexpr, DOT_TY: tl.constexpr, USE_ASM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, JOIN: tl.constexpr = 1,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    g_begin = pid_s * groups_per_split
    g_end = tl.minimum(G, g_begin + groups_per_split)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, 16)
    offs_k = tl.arange(0, 64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
    w_tile = w_ptr + offs_r[None, :] * stride_w + offs_n[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if JOIN == 3:
        tab0 = tl.load(lock_ptr + 4096)  # the four register tables (th0, th2, tl0, tl2), from memory
        tab1 = tl.load(lock_ptr + 4097)
        tab2 = tl.load(lock_ptr + 4098)
        tab3 = tl.load(lock_ptr + 4099)
    for g in range(g_begin, g_end):
        w = tl.load(w_tile + g * 16 * stride_w, mask=n_mask[:, None], other=0)
        am0 = tl.load(absmax_ptr + (2 * g) * stride_am + offs_n, mask=n_mask, other=0.0)
        am1 = tl.load(absmax_ptr + (2 * g + 1) * stride_am + offs_n, mask=n_mask, other=0.0)
        kb = g * 128
        x0 = tl.load(x_cols + (kb + offs_k)[:, None] * stride_xk, mask=m_mask[None, :], other=0.0).to(DOT_TY)
        x1 = tl.load(x_cols + (kb + 64 + offs_k)[:, None] * stride_xk, mask=m_mask[None, :], other=0.0).to(DOT_TY)
        if JOIN == 2:
            c0, c1, c2, c3 = _codes_half(w, asm_lo, DOT_TY)
            acc += tl.dot(_cat4(c0, c1, c2, c3, BLOCK_N), x0) * am0[:, None]
            c4, c5, c6, c7 = _codes_half(w, asm_hi, DOT_TY)
            acc += tl.dot(_cat4(c4, c5, c6, c7, BLOCK_N), x1) * am1[:, None]
        if JOIN == 3:
            c0, c1, c2, c3 = _codes_half_regs(w, tab0, tab1, tab2, tab3, asm_lo, DOT_TY)
            acc += tl.dot(_cat4(c0, c1, c2, c3, BLOCK_N), x0) * am0[:, None]
            c4, c5, c6, c7 = _codes_half_regs(w, tab0, tab1, tab2, tab3, asm_hi, DOT_TY)
            acc += tl.dot(_cat4(c4, c5, c6, c7, BLOCK_N), x1) * am1[:, None]
        if JOIN == 1:
            c0, c1, c2, c3, c4, c5, c6, c7 = _codes2(w, asm, DOT_TY)
            a0 = _cat4(c0, c1, c2, c3, BLOCK_N)
            a1 = _cat4(c4, c5, c6, c7, BLOCK_N)
            acc += tl.dot(a0, x0) * am0[:, None]
            acc += tl.dot(a1, x1) * am1[:, None]
    _epilogue(acc, out_ptr, ws_ptr, lock_ptr, offs_m, offs_n, m_mask, n_mask, M, N, pid_m, pid_n, pid_s,
              SPLIT_K, BLOCK_M, BLOCK_N)


@functools.lru_cache(maxsize=8)
def scaled_asm(dtype, half):
    """PTX: nibbles 4h..4h+3 of words $5 (a), $6 (b), times the scale pair $7 -> $0..$3; $4 unused."""
    a = half_asm(dtype, half)
    mul = "mul.rn.bf16x2" if dtype == torch.bfloat16 else "mul.rn.f16x2"
    a = a.replace("$4", "$A").replace("$5", "$B").replace("$A", "$4").replace("$B", "$5")
    for o in range(4):
        a = a.replace(f"prmt.b32 ${o}, lo, hi", f"prmt.b32 c{o}, lo, hi")
    a = a.replace(".reg .b32 t0,", ".reg .b32 c0, c1, c2, c3, t0,")
    tail = "".join(f"{mul} ${o}, c{o}, $6;\n" for o in range(4))
    return a[:-1] + tail + "}"


@triton.jit
def _scaled_half(w, am, asm: tl.constexpr, ty: tl.constexpr):
    i16 = tl.int16
    c0, c1, c2, c3 = tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r,r,r", [w, am], dtype=(i16, i16, i16, i16),
                                               is_pure=True, pack=2)
    return c0.to(ty, bitcast=True), c1.to(ty, bitcast=True), c2.to(ty, bitcast=True), c3.to(ty, bitcast=True)


@triton.jit
def _cat8(c0, c1, c2, c3, c4, c5, c6, c7, BLOCK_N: tl.constexpr):
    a = _cat4(c0, c1, c2, c3, BLOCK_N)
    b = _cat4(c4, c5, c6, c7, BLOCK_N)
    t = tl.permute(tl.join(a, b), (0, 2, 1))  # [BLOCK_N, 2, 64]
    return tl.reshape(t, (BLOCK_N, 128))


@triton.jit
def words_kernel_v3(
    x_ptr, w_ptr, absmax_ptr, code_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr, M, N, groups_per_split, G,
    stride_xm, stride_xk, stride_w, stride_am,
    asm: tl.constexpr, asm_lo: tl.constexpr, asm_hi: tl.constexpr, DOT_TY: tl.constexpr, USE_ASM: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, JOIN: tl.constexpr = 1,
):
    # absmax_ptr: [2G, N] in the activation dtype
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    g_begin = pid_s * groups_per_split
    g_end = tl.minimum(G, g_begin + groups_per_split)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, 16)
    offs_k = tl.arange(0, 128)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
    w_tile = w_ptr + offs_r[None, :] * stride_w + offs_n[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for g in range(g_begin, g_end):
        w = tl.load(w_tile + g * 16 * stride_w, mask=n_mask[:, None], other=0)
        am0 = tl.load(absmax_ptr + (2 * g) * stride_am + offs_n, mask=n_mask, other=0.0)
        am1 = tl.load(absmax_ptr + (2 * g + 1) * stride_am + offs_n, mask=n_mask, other=0.0)
        xt = tl.load(x_cols + (g * 128 + offs_k)[:, None] * stride_xk, mask=m_mask[None, :], other=0.0)
        c0, c1, c2, c3 = _scaled_half(w, am0[:, None], asm_lo, DOT_TY)
        c4, c5, c6, c7 = _scaled_half(w, am1[:, None], asm_hi, DOT_TY)
        acc = tl.dot(_cat8(c0, c1, c2, c3, c4, c5, c6, c7, BLOCK_N), xt, acc)
    _epilogue(acc, out_ptr, ws_ptr, lock_ptr, offs_m, offs_n, m_mask, n_mask, M, N, pid_m, pid_n, pid_s,
              SPLIT_K, BLOCK_M, BLOCK_N)
