// Fast float32 → float16 rounding (round to nearest even) for whole arrays: the merge writes
// hundreds of millions of float16 values, and a function call per value costs 3–4× more. Same bits
// as float16.ts's halfBitsFromFloat (which handles the rare subnormal results here).
import { halfBitsFromFloat } from '../float16.ts';

const F16_MAX_BITS = (127 + 16) << 23; // 65536: at or above is Inf (or NaN)
const F32_INF_BITS = 255 << 23;
const MIN_NORMAL_BITS = 113 << 23; // 2^-14: below it the float16 is subnormal or zero

/** out[j] = float16 bits of values[j] for j < n. */
export function float32ToHalfBits(values: Float32Array, n: number, out: Uint16Array): void {
  const bits = new Uint32Array(values.buffer, values.byteOffset, n);
  for (let j = 0; j < n; j++) {
    const x = bits[j];
    const sign = (x >>> 16) & 0x8000;
    const a = x & 0x7fffffff;
    let h: number;
    if (a >= F16_MAX_BITS) h = a > F32_INF_BITS ? 0x7e00 : 0x7c00;
    else if (a < MIN_NORMAL_BITS) h = halfBitsFromFloat(values[j]) & 0x7fff;
    else h = (a + ((15 - 127) << 23) + 0xfff + ((a >>> 13) & 1)) >>> 13;
    out[j] = sign | h;
  }
}
