"""fp32 -> storage dtype conversion with round-to-nearest-even, identical on the GPU and the interpreter.

The Triton interpreter converts fp32 to bf16 by truncation, so a plain `.to(tl.bfloat16)` gives
different bits there than on the GPU. Rounding the fp32 bit pattern first leaves a value that bf16
holds exactly, which both conversions then keep as is.
"""

import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
