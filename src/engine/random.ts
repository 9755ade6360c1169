// Seeded Gaussian noise identical to PyTorch's CPU generator:
//   torch.randn(shape, generator=torch.Generator('cpu').manual_seed(seed), dtype=torch.float32)
// so that a seed gives the same starting latents (and the same picture) here as in diffusers.
//
// Facts taken from ATen (checked bit-for-bit against torch 1.13 on x86-64 with AVX2):
// - the engine is a standard MT19937 seeded with the low 32 bits of the 64-bit seed;
// - float32 tensors with >= 16 elements: every element first gets a uniform k / 2^24 (one 32-bit
//   draw each), then each block of 16 becomes 8 Box-Muller pairs: element j and j + 8 of the block
//   use u1 = 1 - data[j], u2 = data[j + 8]. A trailing partial block is handled by drawing 16 fresh
//   uniforms for the *last* 16 elements and transforming them again. The AVX2 kernel computes log,
//   sin and cos with the Cephes polynomials of avx_mathfun.h in float32, and GCC contracts their
//   multiply-then-add pairs into FMAs; which pairs was settled by comparing against torch;
// - smaller tensors use the scalar double-precision Box-Muller (53-bit uniforms from two 32-bit
//   draws), which returns r·cos θ and caches r·sin θ in the generator for the next scalar sample.

const MT_N = 624;
const MT_M = 397;
const MATRIX_A = 0x9908b0df;
const UPPER_MASK = 0x80000000;
const LOWER_MASK = 0x7fffffff;

const TWO_POW_24 = 16777216;
const TWO_POW_32 = 4294967296;
const TWO_POW_53 = 9007199254740992;

const f32 = Math.fround;

/** Wraps any integer (negative, or up to 2^64 - 1 and beyond) to the uint64 torch would store. */
export function normaliseSeed(seed: number | bigint): bigint {
  let value: bigint;
  if (typeof seed === 'bigint') {
    value = seed;
  } else {
    if (!Number.isInteger(seed)) throw new RangeError(`seed must be an integer, got ${seed}`);
    if (!Number.isSafeInteger(seed)) {
      throw new RangeError(`seed ${seed} is not exactly representable as a number; pass a bigint`);
    }
    value = BigInt(seed);
  }
  return BigInt.asUintN(64, value);
}

/** Standard 32-bit Mersenne Twister, the engine of torch's CPU generator. */
class MersenneTwister {
  private readonly state = new Uint32Array(MT_N);
  private index = MT_N;

  constructor(seed32: number) {
    const state = this.state;
    state[0] = seed32 >>> 0;
    for (let i = 1; i < MT_N; i++) {
      const prev = state[i - 1] ^ (state[i - 1] >>> 30);
      state[i] = (Math.imul(1812433253, prev) + i) >>> 0;
    }
  }

  nextUint32(): number {
    if (this.index >= MT_N) this.twist();
    let y = this.state[this.index++];
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  private twist(): void {
    const state = this.state;
    for (let i = 0; i < MT_N; i++) {
      const y = (state[i] & UPPER_MASK) | (state[(i + 1) % MT_N] & LOWER_MASK);
      let next = state[(i + MT_M) % MT_N] ^ (y >>> 1);
      if (y & 1) next ^= MATRIX_A;
      state[i] = next >>> 0;
    }
    this.index = 0;
  }
}

// --- float32 helpers --------------------------------------------------------------------------

const conversionBuffer = new DataView(new ArrayBuffer(4));

function floatBits(x: number): number {
  conversionBuffer.setFloat32(0, x);
  return conversionBuffer.getUint32(0);
}

function bitsToFloat(bits: number): number {
  conversionBuffer.setUint32(0, bits >>> 0);
  return conversionBuffer.getFloat32(0);
}

/**
 * Single-rounded float32 fused multiply-add (C's fmaf) for float32 inputs. a·b is exact in a double; the sum is
 * rounded once to double, which only misleads the final float32 rounding when it lands exactly on a
 * float32 halfway point, so that case is decided by the sign of the sum's rounding error.
 */
export function fmaf(a: number, b: number, c: number): number {
  const product = a * b;
  const sum = product + c;
  const rounded = f32(sum);
  const error = twoSumError(product, c, sum);
  if (error === 0 || !Number.isFinite(sum)) return rounded;
  const other = rounded === sum ? rounded : neighbourTowards(rounded, sum);
  // Only a halfway sum is ambiguous: it is equally far from the two neighbouring floats.
  if (Math.abs(sum - rounded) !== Math.abs(other - sum) || other === rounded) return rounded;
  const trueIsAbove = error > 0;
  const lower = Math.min(rounded, other);
  const upper = Math.max(rounded, other);
  return trueIsAbove ? upper : lower;
}

function twoSumError(a: number, b: number, sum: number): number {
  const bVirtual = sum - a;
  const aVirtual = sum - bVirtual;
  return a - aVirtual + (b - bVirtual);
}

/** The float32 adjacent to `x` (a float32) in the direction of `target`. */
function neighbourTowards(x: number, target: number): number {
  if (x === target) return x;
  if (x === 0) return target > 0 ? bitsToFloat(1) : bitsToFloat(0x80000001);
  const bits = floatBits(x);
  const awayFromZero = target > x === x > 0;
  return bitsToFloat(awayFromZero ? bits + 1 : bits - 1);
}

// --- avx_mathfun (Cephes) log and sincos in float32 --------------------------------------------

const LOG_P = [
  7.0376836292e-2, -1.151461031e-1, 1.167699874e-1, -1.2420140846e-1, 1.4249322787e-1,
  -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
].map(f32);
const LOG_Q1 = f32(-2.1219444e-4);
const LOG_Q2 = f32(0.693359375);
const SQRT_HALF = f32(0.707106781186547524);

/** log of a float32 in [2^-24, 1], the way log256_ps evaluates it. */
function cephesLogf(value: number): number {
  const bits = floatBits(value);
  let exponent = f32((bits >>> 23) - 0x7f + 1);
  let x = bitsToFloat((bits & ~0x7f800000) | floatBits(0.5));
  let extra = 0;
  if (x < SQRT_HALF) {
    extra = x;
    exponent = f32(exponent - 1);
  }
  x = f32(f32(x - 1) + extra);
  const z = f32(x * x);
  let y = LOG_P[0];
  for (let i = 1; i < LOG_P.length; i++) y = fmaf(y, x, LOG_P[i]);
  y = f32(y * x);
  y = fmaf(y, z, f32(exponent * LOG_Q1));
  y = f32(y - f32(z * 0.5));
  x = f32(x + y);
  return fmaf(exponent, LOG_Q2, x);
}

const FOUR_OVER_PI = f32(1.27323954473516);
const MINUS_DP1 = f32(-0.78515625);
const MINUS_DP2 = f32(-2.4187564849853515625e-4);
const MINUS_DP3 = f32(-3.77489497744594108e-8);
const SIN_P0 = f32(-1.9515295891e-4);
const SIN_P1 = f32(8.3321608736e-3);
const SIN_P2 = f32(-1.6666654611e-1);
const COS_P0 = f32(2.443315711809948e-5);
const COS_P1 = f32(-1.388731625493765e-3);
const COS_P2 = f32(4.166664568298827e-2);

/** sin and cos of a non-negative float32 below 2^31, the way sincos256_ps evaluates them. */
function cephesSinCosf(angle: number): { sin: number; cos: number } {
  let octant = Math.trunc(f32(angle * FOUR_OVER_PI));
  octant = (octant + 1) & ~1;
  const y = octant;
  const sinNegative = (octant & 4) !== 0;
  // In octants 2, 3, 6 and 7 sine and cosine swap polynomials.
  const swapped = (octant & 2) !== 0;
  const cosNegative = ((octant - 2) & 4) === 0;

  let x = fmaf(y, MINUS_DP1, angle);
  x = fmaf(y, MINUS_DP2, x);
  x = fmaf(y, MINUS_DP3, x);

  const z = f32(x * x);
  let cosPoly = fmaf(COS_P0, z, COS_P1);
  cosPoly = fmaf(cosPoly, z, COS_P2);
  cosPoly = f32(cosPoly * z);
  cosPoly = fmaf(cosPoly, z, -f32(z * 0.5));
  cosPoly = f32(cosPoly + 1);

  let sinPoly = fmaf(SIN_P0, z, SIN_P1);
  sinPoly = fmaf(sinPoly, z, SIN_P2);
  sinPoly = f32(sinPoly * z);
  sinPoly = fmaf(sinPoly, x, x);

  const sinMagnitude = swapped ? cosPoly : sinPoly;
  const cosMagnitude = swapped ? sinPoly : cosPoly;
  return {
    sin: sinNegative ? -sinMagnitude : sinMagnitude,
    cos: cosNegative ? -cosMagnitude : cosMagnitude,
  };
}

const TWO_PI_F32 = f32(2 * Math.PI);

/** Box-Muller over one block of 16 uniforms, in place (torch's normal_fill_16_AVX2). */
function boxMuller16(data: Float32Array, offset: number): void {
  for (let j = 0; j < 8; j++) {
    const u1 = f32(1 - data[offset + j]);
    const u2 = data[offset + j + 8];
    const radius = f32(Math.sqrt(f32(-2 * cephesLogf(u1))));
    const theta = f32(TWO_PI_F32 * u2);
    const { sin, cos } = cephesSinCosf(theta);
    data[offset + j] = f32(radius * cos);
    data[offset + j + 8] = f32(radius * sin);
  }
}

/** A torch.Generator('cpu') after manual_seed(seed). Draws continue across calls, like torch's. */
export class TorchGenerator {
  readonly seed: bigint;
  private readonly engine: MersenneTwister;
  private cachedNormal: number | undefined;

  constructor(seed: number | bigint) {
    this.seed = normaliseSeed(seed);
    this.engine = new MersenneTwister(Number(this.seed & 0xffffffffn));
  }

  /** The next raw 32-bit output of the engine. */
  nextUint32(): number {
    return this.engine.nextUint32();
  }

  /** A float32 uniform in [0, 1) with 24 random bits (at::uniform_real_distribution<float>). */
  private uniformFloat(): number {
    return (this.engine.nextUint32() & 0xffffff) / TWO_POW_24;
  }

  /** A double uniform in [0, 1) with 53 random bits, from two draws (high word first). */
  private uniformDouble(): number {
    const high = this.engine.nextUint32() & 0x1fffff;
    const low = this.engine.nextUint32();
    return (high * TWO_POW_32 + low) / TWO_POW_53;
  }

  private scalarNormal(): number {
    if (this.cachedNormal !== undefined) {
      const cached = this.cachedNormal;
      this.cachedNormal = undefined;
      return cached;
    }
    const u1 = this.uniformDouble();
    const u2 = this.uniformDouble();
    const radius = Math.sqrt(-2 * Math.log(1 - u2));
    const theta = 2 * Math.PI * u1;
    this.cachedNormal = radius * Math.sin(theta);
    return radius * Math.cos(theta);
  }

  /** `count` standard normal float32 values: torch.randn(count, generator=this) (any shape of that size). */
  randn(count: number): Float32Array {
    if (!Number.isSafeInteger(count) || count < 0) {
      throw new RangeError(`randn needs a non-negative integer count, got ${count}`);
    }
    const data = new Float32Array(count);
    if (count < 16) {
      for (let i = 0; i < count; i++) data[i] = this.scalarNormal();
      return data;
    }
    for (let i = 0; i < count; i++) data[i] = this.uniformFloat();
    for (let i = 0; i + 16 <= count; i += 16) boxMuller16(data, i);
    if (count % 16 !== 0) {
      const tail = count - 16;
      for (let i = 0; i < 16; i++) data[tail + i] = this.uniformFloat();
      boxMuller16(data, tail);
    }
    return data;
  }
}

/** torch.randn(shape, generator=torch.Generator('cpu').manual_seed(seed), dtype=torch.float32), flattened. */
export function randn(shape: readonly number[], seed: number | bigint): Float32Array {
  let count = 1;
  for (const dim of shape) {
    if (!Number.isSafeInteger(dim) || dim < 0) throw new RangeError(`bad dimension ${dim} in shape [${shape.join(', ')}]`);
    count *= dim;
  }
  return new TorchGenerator(seed).randn(count);
}
