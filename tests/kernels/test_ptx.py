"""The decode kernels' inline PTX (_ptx.py), simulated instruction by instruction on the CPU: the values it gives
and where the kernels' joins put them."""
import numpy as np
import pytest

from ttha.kernels import _backend, _ptx, mma


def _half(bits: int, bf16: bool) -> float:
    """A 16-bit fp16/bf16 bit pattern as a float."""
    if bf16:
        return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def _to_half(v: float, bf16: bool) -> int:
    """v rounded once (to nearest even) to fp16/bf16, as its bit pattern."""
    if not bf16:
        return int(np.array([v], dtype=np.float16).view(np.uint16)[0])
    u = int(np.array([v], dtype=np.float32).view(np.uint32)[0])  # exact here: the test's values fit fp32
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def _simulate_ptx(ptx: str, regs: dict) -> dict:
    """A tiny simulator for the handful of PTX instructions the kernels' inline PTX uses: integer registers as
    bit patterns, each half2 op rounded once as the hardware does. So the CPU suite checks the PTX the GPU
    runs. `regs` holds the operands ($1, ...); returns every register."""
    import re

    regs = dict(regs)
    halves = lambda r, bf: (_half(regs[r] & 0xFFFF, bf), _half(regs[r] >> 16, bf))  # noqa: E731
    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}", "") or line.startswith(".reg"):
            continue
        if split := re.fullmatch(r"mov\.b32 \{(\S+), (\S+)\}, (\S+)", line):  # a register into two halves
            regs[split[1]], regs[split[2]] = regs[split[3]] & 0xFFFF, regs[split[3]] >> 16
            continue
        if pack := re.fullmatch(r"mov\.b32 (\S+), \{(\S+), (\S+)\}", line):  # two halves into a register
            regs[pack[1]] = (regs[pack[2]] & 0xFFFF) | (regs[pack[3]] & 0xFFFF) << 16
            continue
        op, *a = re.split(r"[\s,]+", line)
        if op == "mov.b32":
            regs[a[0]] = int(a[1], 16)
        elif op == "lop3.b32":  # 0xEA: (a & b) | c
            assert a[4] == "0xEA"
            regs[a[0]] = (regs[a[1]] & int(a[2], 16)) | regs[a[3]]
        elif op == "and.b32":
            regs[a[0]] = regs[a[1]] & int(a[2], 16)
        elif op == "shr.u32":
            regs[a[0]] = regs[a[1]] >> int(a[2])
        elif op.endswith(("f16x2", "bf16x2")):
            bf = op.endswith("bf16x2")
            xs = [halves(r, bf) for r in a[1:]]
            f = {"sub": lambda p, q: p - q, "mul": lambda p, q: p * q,
                 "fma": lambda p, q, c: p * q + c}[op.split(".")[0]]
            lo, hi = (_to_half(f(*(x[i] for x in xs)), bf) for i in (0, 1))
            regs[a[0]] = lo | hi << 16
        elif op == "cvt.rn.bf16x2.f32":  # the first source into the high half
            regs[a[0]] = _to_half(regs[a[2]], True) | _to_half(regs[a[1]], True) << 16
        elif op == "cvt.f32.f16":
            regs[a[0]] = _half(regs[a[1]], False)
        elif op == "add.f32":
            regs[a[0]] = float(np.float32(regs[a[1]]) + np.float32(regs[a[2]]))
        else:
            raise AssertionError(f"unsimulated PTX: {line}")
    return regs


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("bf16", [False, True])
def test_dequant_ptx_gives_codes_in_k_order(bits, bf16):
    """The PTX the decode matmul dequantizes with on CUDA, simulated: each code of random words comes out as
    code * scale + min (fp16 scale and min, as stored) rounded once to fp16 (then to bf16 for bf16 x), at the
    output that the kernel's tl.join tree (stack along a new last axis) and reshape put back at the code's
    K position."""
    rng = np.random.default_rng(bits + 2 * bf16)
    pw, ptx = 32 // bits, _ptx._dequant_ptx(bits, bf16)
    for _ in range(30):
        codes = rng.integers(0, 2**bits, pw)
        word = sum(int(c) << (bits * j) for j, c in enumerate(codes))
        s, m = (_to_half(v, False) for v in (rng.uniform(1e-3, 0.1), rng.uniform(-1, 1)))
        regs = _simulate_ptx(ptx, {f"${pw}": word, f"${pw + 1}": s, f"${pw + 2}": m})
        outs = [np.array(_half(regs[f"${o}"], bf16)) for o in range(pw)]
        # _join8 (and the outer join for int2): tl.join stacks along a new last axis
        j8 = lambda c: np.stack([np.stack([np.stack(c[0:2], -1), np.stack(c[2:4], -1)], -1),  # noqa: E731
                                 np.stack([np.stack(c[4:6], -1), np.stack(c[6:8], -1)], -1)], -1)
        w = (j8(outs) if bits == 4 else np.stack([j8(outs[:8]), j8(outs[8:])], -1)).reshape(-1)
        w16 = [_half(_to_half(float(c) * _half(s, False) + _half(m, False), False), False) for c in codes]
        want = [_half(_to_half(v, True), True) for v in w16] if bf16 else w16
        assert list(w) == want, (codes, list(w), want)
        if bf16:  # within a bf16 plus an fp16 rounding of the exact value (the reference: one bf16 rounding)
            exact = codes * _half(s, False) + _half(m, False)
            assert np.all(np.abs(np.array(w) - exact) <= (2.0**-8 + 2.0**-11) * np.abs(exact) + 1e-7)


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("bits", [4, 2])
def test_word_dot_ptx_sums_code_times_x(bits):
    """The PTX the GEMV runs on CUDA, simulated: every code of random words, read in place as an fp16 subnormal
    and times x's half2 pairs (a group at +-2**15, times 2**-pos, as _x_pairs_kernel writes them), sums to
    2**-24 sum_j code_j * x_j, within fp16 rounding of the partial sums."""
    rng = np.random.default_rng(bits)
    pw, ptx = 32 // bits, _ptx._word_dot_ptx(bits)
    for _ in range(50):
        codes = rng.integers(0, 2**bits, pw)
        x = rng.uniform(-2**15, 2**15, pw)
        word = sum(int(c) << (bits * j) for j, c in enumerate(codes))
        pairs = []
        for p, (_sh, pos) in enumerate(_ptx._pair_shifts(bits)):
            lo, hi = np.float16(x[p] * 2.0**-pos), np.float16(x[p + pw // 2] * 2.0**-pos)
            pairs.append(int(np.array([lo, hi]).view(np.uint32)[0]))
        exact = float(sum(codes * x)) * 2.0**-24
        got = _simulate_ptx(ptx, {"$1": word, **{f"${i + 2}": q for i, q in enumerate(pairs)}})["$0"]
        assert abs(got - exact) <= 2e-3 * float(np.sum(np.abs(codes * x))) * 2.0**-24 + 2.0**-24, (codes, x, got, exact)


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("bf16", [False, True])
def test_codes_ptx_and_joins_give_the_mma_order(bits, bf16):
    """The PTX _mma_kernel unpacks words with on CUDA, simulated, then _mma_codes' joins, permute and reshape
    (numpy's stack and transpose): every code of a 4-word block comes out exact, as magic + code in x's dtype,
    at the place mma_order gives its K column, where _x_mma_kernel puts x's value (checked on the kernel below)."""
    rng = np.random.default_rng(bits + 2 * bf16)
    pw, ptx, magic = 32 // bits, _ptx._codes_ptx(bits, bf16), _half(_ptx.MMA_MAGIC[bf16], bf16)
    order = mma.mma_order(bits, 4 * pw).numpy()
    for _ in range(10):
        codes = rng.integers(0, 2**bits, (4, pw))  # 4 words
        outs = np.zeros((pw, 4))
        for w in range(4):
            word = sum(int(c) << (bits * j) for j, c in enumerate(codes[w]))
            regs = _simulate_ptx(ptx, {f"${pw}": word})
            outs[:, w] = [_half(regs[f"${o}"], bf16) for o in range(pw)]
        pairs = [np.stack([outs[2 * j], outs[2 * j + 1]], -1) for j in range(pw // 2)]  # tl.join: a new last axis
        v = np.stack([np.stack(pairs[0:2], -1), np.stack(pairs[2:4], -1)], -1)
        if bits == 4:
            v = v.reshape(1, 4, 2, 2, 2).transpose(0, 4, 3, 1, 2)
        else:
            v = np.stack([v, np.stack([np.stack(pairs[4:6], -1), np.stack(pairs[6:8], -1)], -1)], -1)
            v = v.reshape(1, 4, 2, 2, 2, 2).transpose(0, 5, 4, 3, 1, 2)
        got = v.reshape(-1)[order]  # K order back
        assert list(got) == list(magic + codes.reshape(-1).astype(float))
