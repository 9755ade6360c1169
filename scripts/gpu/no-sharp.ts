// Stands in for sharp in the GPU bench bundle (scripts/gpu/pack.sh): the bench renders no PNG, and the
// GPU machine has no sharp. Any call says so.
export default function sharp(): never {
  throw new Error('sharp is not in the GPU bench bundle (scripts/gpu/engine-bench.ts writes no image files)');
}
