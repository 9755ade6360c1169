// Numeric building blocks that reproduce what diffusers' schedulers get from torch (float32 on
// CPU) and NumPy (float64), so that timesteps, sigmas and trajectories match diffusers'.
import { fmaf } from '../random.ts';

export const f32 = Math.fround;

/**
 * torch.linspace(start, end, steps, dtype=torch.float32) on the CPU, bit for bit: a float32 step,
 * the first half counted up from `start` and the second half down from `end`, in 8-lane chunks
 * (two chunks per loop turn) whose first element is a fused multiply-add and whose other lanes are
 * base + k·step; leftover elements are computed one by one.
 */
export function torchLinspaceFloat32(startValue: number, endValue: number, steps: number): Float32Array {
  const out = new Float32Array(steps);
  if (steps === 0) return out;
  const start = f32(startValue);
  const end = f32(endValue);
  if (steps === 1) {
    out[0] = start;
    return out;
  }
  const step = f32(f32(end - start) / f32(steps - 1));
  const halfway = Math.floor(steps / 2);
  const valueAt = (index: number) =>
    index < halfway ? fmaf(step, index, start) : fmaf(-step, steps - index - 1, end);
  const chunk = (index: number) => {
    const base = valueAt(index);
    out[index] = base;
    for (let lane = 1; lane < 8; lane++) out[index + lane] = f32(base + f32(lane * step));
  };
  let i = 0;
  for (; i <= steps - 16; i += 16) {
    chunk(i);
    chunk(i + 8);
  }
  for (; i < steps; i++) out[i] = valueAt(i);
  return out;
}

/** torch.cumprod of a float32 tensor on the CPU: a float64 running product, each prefix rounded to float32. */
export function cumprodFloat32(values: ArrayLike<number>): Float32Array {
  const out = new Float32Array(values.length);
  let product = 1;
  for (let i = 0; i < values.length; i++) {
    product *= values[i];
    out[i] = product;
  }
  return out;
}

/** np.linspace(start, stop, num) in float64 (endpoint included). */
export function numpyLinspace(start: number, stop: number, num: number): number[] {
  if (num <= 0) return [];
  if (num === 1) return [start];
  const step = (stop - start) / (num - 1);
  const out = Array.from({ length: num }, (_, i) => i * step + start);
  out[num - 1] = stop;
  return out;
}

/**
 * np.arange(start, stop, step) in float64: the length is ceil((stop - start) / step), element 1 is
 * start + step and element i >= 2 is start + i·delta with delta = (start + step) - start, as NumPy
 * fills float ranges.
 */
export function numpyArange(start: number, stop: number, step: number): number[] {
  if (step === 0) throw new RangeError('arange step must not be zero');
  const length = Math.max(0, Math.ceil((stop - start) / step));
  if (length === 0) return [];
  const out = [start];
  if (length > 1) out.push(start + step);
  const delta = start + step - start;
  for (let i = 2; i < length; i++) out.push(start + i * delta);
  return out;
}

/** np.round / np.rint: to the nearest integer, halves to even. */
export function roundHalfEven(x: number): number {
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff < 0.5) return floor;
  if (diff > 0.5) return floor + 1;
  return floor % 2 === 0 ? floor : floor + 1;
}

/** np.interp(x, xp, fp) for increasing xp, in float64 (clamped at both ends, like NumPy). */
export function numpyInterp(x: number, xp: ArrayLike<number>, fp: ArrayLike<number>): number {
  const last = xp.length - 1;
  if (x <= xp[0]) return fp[0];
  if (x >= xp[last]) return fp[last];
  let low = 0;
  let high = last;
  while (high - low > 1) {
    const mid = (low + high) >> 1;
    if (xp[mid] <= x) low = mid;
    else high = mid;
  }
  if (xp[low] === x) return fp[low];
  const slope = (fp[low + 1] - fp[low]) / (xp[low + 1] - xp[low]);
  return slope * (x - xp[low]) + fp[low];
}
