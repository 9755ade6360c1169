// Fréchet distance between two feature distributions (the FID formula on the attribute
// classifier's features): |μa − μb|² + Tr(Σa + Σb − 2 (Σa Σb)^½), with
// Tr((Σa Σb)^½) = Σ √λ(Σa^½ Σb Σa^½) so that only symmetric eigenproblems are solved (Jacobi).

export interface FeatureStats {
  n: number;
  dim: number;
  mean: Float64Array;
  /** Row-major dim × dim sample covariance (divided by n − 1, as numpy's cov). */
  cov: Float64Array;
}

export function featureStats(features: ArrayLike<number>[]): FeatureStats {
  const n = features.length;
  if (n < 2) throw new Error('feature statistics need at least two vectors');
  const dim = features[0].length;
  const mean = new Float64Array(dim);
  for (const f of features) {
    if (f.length !== dim) throw new Error(`feature vectors of lengths ${dim} and ${f.length}`);
    for (let i = 0; i < dim; i++) mean[i] += f[i] / n;
  }
  const cov = new Float64Array(dim * dim);
  const centred = new Float64Array(dim);
  for (const f of features) {
    for (let i = 0; i < dim; i++) centred[i] = f[i] - mean[i];
    for (let i = 0; i < dim; i++) {
      const ci = centred[i];
      if (ci === 0) continue;
      for (let j = i; j < dim; j++) cov[i * dim + j] += ci * centred[j];
    }
  }
  for (let i = 0; i < dim; i++) {
    for (let j = i; j < dim; j++) {
      const v = cov[i * dim + j] / (n - 1);
      cov[i * dim + j] = v;
      cov[j * dim + i] = v;
    }
  }
  return { n, dim, mean, cov };
}

/**
 * Eigenvalues (and, when asked, eigenvectors as the columns of a row-major matrix) of a symmetric
 * n × n matrix by cyclic Jacobi rotations. The input is not modified.
 */
export function symmetricEigen(matrix: Float64Array, n: number, wantVectors = false): { values: Float64Array; vectors?: Float64Array } {
  const a = Float64Array.from(matrix);
  const v = wantVectors ? new Float64Array(n * n) : undefined;
  if (v) for (let i = 0; i < n; i++) v[i * n + i] = 1;
  const offNorm = () => {
    let s = 0;
    for (let i = 0; i < n; i++) for (let j = i + 1; j < n; j++) s += a[i * n + j] ** 2;
    return s;
  };
  let total = 0;
  for (let i = 0; i < n * n; i++) total += a[i] ** 2;
  const tolerance = 1e-30 * Math.max(total, Number.MIN_VALUE);
  for (let sweep = 0; sweep < 100 && offNorm() > tolerance; sweep++) {
    for (let p = 0; p < n - 1; p++) {
      for (let q = p + 1; q < n; q++) {
        const apq = a[p * n + q];
        if (apq === 0) continue;
        const app = a[p * n + p];
        const aqq = a[q * n + q];
        // rotation angle that zeroes a[p][q]: t = tan θ, the smaller root of t² + 2τt − 1 = 0
        const tau = (aqq - app) / (2 * apq);
        const t = Math.sign(tau || 1) / (Math.abs(tau) + Math.sqrt(1 + tau * tau));
        const c = 1 / Math.sqrt(1 + t * t);
        const s = t * c;
        for (let k = 0; k < n; k++) {
          const akp = a[k * n + p];
          const akq = a[k * n + q];
          a[k * n + p] = c * akp - s * akq;
          a[k * n + q] = s * akp + c * akq;
        }
        for (let k = 0; k < n; k++) {
          const apk = a[p * n + k];
          const aqk = a[q * n + k];
          a[p * n + k] = c * apk - s * aqk;
          a[q * n + k] = s * apk + c * aqk;
        }
        if (v) {
          for (let k = 0; k < n; k++) {
            const vkp = v[k * n + p];
            const vkq = v[k * n + q];
            v[k * n + p] = c * vkp - s * vkq;
            v[k * n + q] = s * vkp + c * vkq;
          }
        }
      }
    }
  }
  const values = new Float64Array(n);
  for (let i = 0; i < n; i++) values[i] = a[i * n + i];
  return { values, vectors: v };
}

/** The symmetric square root V·diag(√max(λ, 0))·Vᵀ of a covariance matrix. */
export function sqrtPsd(matrix: Float64Array, n: number): Float64Array {
  const { values, vectors } = symmetricEigen(matrix, n, true);
  const v = vectors!;
  const out = new Float64Array(n * n);
  for (let k = 0; k < n; k++) {
    const root = Math.sqrt(Math.max(values[k], 0));
    if (root === 0) continue;
    for (let i = 0; i < n; i++) {
      const vik = v[i * n + k] * root;
      if (vik === 0) continue;
      for (let j = 0; j < n; j++) out[i * n + j] += vik * v[j * n + k];
    }
  }
  return out;
}

function multiply(a: Float64Array, b: Float64Array, n: number): Float64Array {
  const out = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < n; k++) {
      const aik = a[i * n + k];
      if (aik === 0) continue;
      for (let j = 0; j < n; j++) out[i * n + j] += aik * b[k * n + j];
    }
  }
  return out;
}

/**
 * Fréchet distance between two Gaussians given by their statistics. `sqrtCovA` may be passed when
 * the same `a` (a reference) is compared many times.
 */
export function frechetDistance(a: FeatureStats, b: FeatureStats, sqrtCovA?: Float64Array): number {
  if (a.dim !== b.dim) throw new Error(`feature dimensions differ: ${a.dim} vs ${b.dim}`);
  const n = a.dim;
  let meanTerm = 0;
  let traceA = 0;
  let traceB = 0;
  for (let i = 0; i < n; i++) {
    meanTerm += (a.mean[i] - b.mean[i]) ** 2;
    traceA += a.cov[i * n + i];
    traceB += b.cov[i * n + i];
  }
  const rootA = sqrtCovA ?? sqrtPsd(a.cov, n);
  const middle = multiply(multiply(rootA, b.cov, n), rootA, n);
  for (let i = 0; i < n; i++) {
    for (let j = i + 1; j < n; j++) {
      const s = (middle[i * n + j] + middle[j * n + i]) / 2;
      middle[i * n + j] = s;
      middle[j * n + i] = s;
    }
  }
  const { values } = symmetricEigen(middle, n);
  let traceSqrt = 0;
  for (const x of values) traceSqrt += Math.sqrt(Math.max(x, 0));
  return meanTerm + traceA + traceB - 2 * traceSqrt;
}
