"""fp32 -> storage dtype conversion with round-to-nearest-even, identical on the GPU and the interpreter,
and the matrix product every kernel here uses.

On the GPU, `.to(tl.bfloat16)` is one round-to-nearest-even conversion, and NaN and Inf pass through.
The Triton interpreter converts fp32 to bf16 by truncation instead, so there the fp32 bit pattern is
rounded first, leaving a value that bf16 holds exactly. That bit trick is confined to the interpreter:
on the GPU a NaN is 0x7FFFFFFF, whose rounding carry would run into the sign bit and turn it into -0.0.
"""

import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


# Triton picks the interpreter when a function is decorated, so a probe decorated with this module tells
# which one every kernel of this package got.
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"
_INTERPRETED = tl.constexpr(INTERPRETED)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    if _INTERPRETED and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    return x.to(DTYPE)


@triton.jit
def dot(a, b, acc):
    """acc + a @ b. The interpreter cannot multiply bf16 (numpy has no such type); there, and only there,
    products run in fp32. On the GPU the operands stay in the input dtype for the matrix units, and fp32
    inputs are multiplied in fp32 (not tf32, Triton's default for them)."""
    if _INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)
