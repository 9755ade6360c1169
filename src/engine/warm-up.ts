// One run of a freshly opened graph at the package's default size, so that the first job does not pay
// for what onnxruntime does on a session's first run (under CUDA: cuDNN's convolution algorithm
// search for each shape, memory arena growth, kernel loading). Inputs are zeros, shaped from the
// manifest's defaults and the graph's metadata: batch 2 (classifier-free guidance of one image).
import type { GraphRole, Manifest } from './manifest.ts';
import type { GraphSession, InputSpec } from './onnx-session.ts';

const TOKENS = 77;
const BATCH = 2;

/** The dims to feed `input` of a `role` graph, at the package's default size. */
export function warmUpDims(input: InputSpec, role: GraphRole, m: Manifest): number[] {
  const C = m.latent.channels;
  const H = m.defaults.height;
  const W = m.defaults.width;
  const h = Math.max(1, Math.floor(H / m.latent.downsample));
  const w = Math.max(1, Math.floor(W / m.latent.downsample));
  const decoding = role === 'vae_decoder' || role === 'vae_encoder';
  const batch = decoding ? 1 : BATCH;
  const known: Record<string, number[]> = {
    input_ids: [batch, TOKENS],
    sample: role === 'vae_encoder' ? [1, 3, H, W] : [batch, C, h, w],
    latent_sample: [1, C, h, w],
    encoder_attention_mask: [batch, TOKENS],
  };
  const template = known[input.name];
  const declared = input.shape;
  return declared.map((d, i) => {
    if (typeof d === 'number' && d > 0) return d;
    if (template && template.length === declared.length) return template[i];
    // [N,B,…] inputs of an ensemble (N is fixed), [B,…] elsewhere; other free dims 77 next to the
    // batch (token axes) or 1.
    const batchAxis = role === 'ensemble' && declared.length >= 3 ? 1 : 0;
    if (i === batchAxis) return batch;
    if (i === batchAxis + 1 && declared.length - batchAxis === 3) return TOKENS;
    return 1;
  });
}

/** Runs `session` (a `role` graph of `m`) once on zeros, ones for an expert mask. */
export async function warmUpRun(session: GraphSession, role: GraphRole, m: Manifest): Promise<void> {
  const feeds: Parameters<GraphSession['run']>[0] = {};
  for (const spec of session.inputs.values()) {
    if (spec.name === 'timestep') {
      feeds[spec.name] = session.timestepTensor(spec.name, 999, role === 'unet' || role === 'ensemble' ? BATCH : 1);
      continue;
    }
    const dims = warmUpDims(spec, role, m);
    const data = new Float32Array(dims.reduce((a, b) => a * b, 1));
    if (spec.name === 'expert_mask' || spec.name === 'encoder_attention_mask') data.fill(1);
    feeds[spec.name] = session.tensor(spec.name, { data, dims });
  }
  await session.run(feeds);
}
