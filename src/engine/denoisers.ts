// One interface, four ways to turn (latents, t, text) into a prediction: a single expert, the
// average of experts' predictions, a weight-space merge of experts, or one fused ensemble graph (an
// AFA graph with its trained aggregator, or a training-free fuse graph: same inputs and outputs).
import { EngineError, type EnsembleMethod, type Mode } from './api.ts';
import type { EnsembleEntry, ExpertEntry } from './manifest.ts';
import type { ModelPackage } from './model-package.ts';
import type { FloatTensor, GraphSession } from './onnx-session.ts';

export interface DenoiseOutput {
  prediction: Float32Array;
  /** Per-expert weights `[batch, N, h, w]` (afa / fuse: the graph's `contributions`; average: the fixed weights). */
  weights?: Float32Array;
}

/** One expert's text conditioning for the whole model batch. */
export interface Conditioning {
  /** `[batch, 77, D]` */
  hidden: FloatTensor;
  /** `[batch, P]`: the pooled text embedding, for graphs with a `class_labels` input. */
  pooled?: FloatTensor;
  /** `[batch, 77]`: 1 for BOS, prompt and first EOS, 0 for padding (`encoder_attention_mask`). */
  mask?: FloatTensor;
}

export interface Denoiser {
  readonly mode: Mode;
  readonly experts: ExpertEntry[];
  /** `text` holds each expert's conditioning, keyed by expert id. */
  predict(sample: FloatTensor, timestep: number, text: Map<string, Conditioning>): Promise<DenoiseOutput>;
}

const UNET_INPUTS = ['sample', 'timestep', 'encoder_hidden_states'];

function outputName(session: GraphSession, preferred: string): string {
  return session.outputs.has(preferred) ? preferred : [...session.outputs.keys()][0];
}

/** Feeds the optional conditioning inputs a graph declares (pooled text, cross-attention mask). */
function addOptionalInputs(session: GraphSession, feeds: Record<string, ReturnType<GraphSession['tensor']>>, text: Conditioning[], stackPooled: boolean): void {
  if (session.has('encoder_attention_mask')) {
    const mask = text[0].mask;
    if (!mask) throw new EngineError('bad_package', `Graph ${session.file} wants encoder_attention_mask but no mask was computed.`);
    feeds.encoder_attention_mask = session.tensor('encoder_attention_mask', mask);
  }
  if (session.has('class_labels')) {
    const pooled = text.map((c) => c.pooled);
    if (pooled.some((p) => !p)) {
      throw new EngineError('bad_package', `Graph ${session.file} wants class_labels (pooled text) but its text encoder has no pooler_output.`);
    }
    const first = pooled[0]!;
    feeds.class_labels = stackPooled
      ? session.tensor('class_labels', { data: concatAll(pooled.map((p) => p!.data)), dims: [pooled.length, ...first.dims] })
      : session.tensor('class_labels', first);
  }
}

function concatAll(parts: Float32Array[]): Float32Array {
  const out = new Float32Array(parts.reduce((s, p) => s + p.length, 0));
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}

async function runUnet(session: GraphSession, sample: FloatTensor, t: number, text: Conditioning): Promise<Float32Array> {
  const feeds = {
    sample: session.tensor('sample', sample),
    timestep: session.timestepTensor('timestep', t, sample.dims[0]),
    encoder_hidden_states: session.tensor('encoder_hidden_states', text.hidden),
  };
  addOptionalInputs(session, feeds, [text], false);
  const out = await session.run(feeds);
  return out[outputName(session, 'out_sample')].data;
}

function textFor(text: Map<string, Conditioning>, id: string): Conditioning {
  const t = text.get(id);
  if (!t) throw new EngineError('internal', `No text embeddings for expert "${id}".`);
  return t;
}

export class SingleDenoiser implements Denoiser {
  readonly mode = 'single' as const;
  constructor(
    readonly experts: ExpertEntry[],
    private readonly session: GraphSession,
  ) {
    session.require(UNET_INPUTS);
  }

  async predict(sample: FloatTensor, t: number, text: Map<string, Conditioning>): Promise<DenoiseOutput> {
    return { prediction: await runUnet(this.session, sample, t, textFor(text, this.experts[0].id)) };
  }
}

export class AverageDenoiser implements Denoiser {
  readonly mode = 'average' as const;
  constructor(
    readonly experts: ExpertEntry[],
    private readonly sessions: GraphSession[],
    private readonly weights: number[],
  ) {
    for (const s of sessions) s.require(UNET_INPUTS);
  }

  async predict(sample: FloatTensor, t: number, text: Map<string, Conditioning>): Promise<DenoiseOutput> {
    const acc = new Float32Array(sample.data.length);
    for (let i = 0; i < this.sessions.length; i++) {
      const out = await runUnet(this.sessions[i], sample, t, textFor(text, this.experts[i].id));
      const w = this.weights[i];
      for (let j = 0; j < acc.length; j++) acc[j] += w * out[j];
    }
    const [batch, , h, w] = sample.dims;
    const n = this.experts.length;
    const weights = new Float32Array(batch * n * h * w);
    for (let b = 0; b < batch; b++) {
      for (let i = 0; i < n; i++) weights.fill(this.weights[i], (b * n + i) * h * w, (b * n + i + 1) * h * w);
    }
    return { prediction: acc, weights };
  }
}

export class MergeDenoiser implements Denoiser {
  readonly mode = 'merge' as const;
  constructor(
    readonly experts: ExpertEntry[],
    private readonly session: GraphSession,
    private readonly weights: number[],
  ) {
    session.require(UNET_INPUTS);
  }

  async predict(sample: FloatTensor, t: number, text: Map<string, Conditioning>): Promise<DenoiseOutput> {
    // Experts normally share a text encoder; when they don't, the merged model sees the weighted
    // mean of their embeddings, as a merged text encoder would approximately produce.
    const first = textFor(text, this.experts[0].id);
    let embeddings = first;
    if (this.experts.some((e) => textFor(text, e.id) !== first)) {
      const mean = new Float32Array(first.hidden.data.length);
      this.experts.forEach((e, i) => {
        const d = textFor(text, e.id).hidden.data;
        for (let j = 0; j < mean.length; j++) mean[j] += this.weights[i] * d[j];
      });
      embeddings = { ...first, hidden: { data: mean, dims: first.hidden.dims } };
    }
    return { prediction: await runUnet(this.session, sample, t, embeddings) };
  }
}

/**
 * Runs an ensemble's fused graph: mode `afa` (a trained aggregator) or `fuse` (a training-free rule),
 * the ensemble's method. Both graphs take every expert's text stacked `[N, batch, 77, D]` (and an
 * `expert_mask` when they run subsets) and return the prediction and per-expert `contributions`.
 */
export class EnsembleDenoiser implements Denoiser {
  readonly mode: EnsembleMethod;
  private readonly mask: Float32Array | undefined;
  /** Stacked `[N, batch, 77, D]` text per conditioning map: built once per generation, not per step. */
  private readonly stackedText = new WeakMap<Map<string, Conditioning>, { per: Conditioning[]; stacked: FloatTensor }>();

  constructor(
    readonly ensemble: EnsembleEntry,
    readonly allExperts: ExpertEntry[],
    readonly experts: ExpertEntry[],
    private readonly session: GraphSession,
  ) {
    this.mode = ensemble.method;
    session.require(UNET_INPUTS, ['contributions']);
    const subset = experts.length !== allExperts.length;
    if (subset) {
      if (!ensemble.subsets || !session.has('expert_mask')) {
        throw new EngineError(
          'bad_request',
          `The ensemble "${ensemble.id}" was not trained for subsets of its experts; use all of ${ensemble.experts.join(', ')}.`,
        );
      }
    }
    if (session.has('expert_mask')) {
      this.mask = Float32Array.from(allExperts, (e) => (experts.includes(e) ? 1 : 0));
    }
  }

  async predict(sample: FloatTensor, t: number, text: Map<string, Conditioning>): Promise<DenoiseOutput> {
    let cached = this.stackedText.get(text);
    if (!cached) {
      const per = this.allExperts.map((e) => text.get(e.id) ?? textFor(text, this.experts[0].id));
      const data = concatAll(per.map((p) => p.hidden.data));
      cached = { per, stacked: { data, dims: [per.length, ...per[0].hidden.dims] } };
      this.stackedText.set(text, cached);
    }
    const { per, stacked } = cached;
    const s = this.session;
    const feeds: Record<string, ReturnType<GraphSession['tensor']>> = {
      sample: s.tensor('sample', sample),
      timestep: s.timestepTensor('timestep', t, sample.dims[0]),
      encoder_hidden_states: s.tensor('encoder_hidden_states', stacked),
    };
    if (this.mask) feeds.expert_mask = s.tensor('expert_mask', { data: this.mask, dims: [this.mask.length] });
    addOptionalInputs(s, feeds, per, true);
    const out = await s.run(feeds);
    return { prediction: out[outputName(s, 'out_sample')].data, weights: out.contributions.data };
  }
}

export interface DenoiserChoice {
  mode: Mode;
  experts: ExpertEntry[];
  ensemble?: EnsembleEntry;
  weights: number[];
}

export async function createDenoiser(pkg: ModelPackage, choice: DenoiserChoice): Promise<Denoiser> {
  switch (choice.mode) {
    case 'single':
      return new SingleDenoiser(choice.experts, await pkg.session(choice.experts[0].unet));
    case 'average':
      return new AverageDenoiser(
        choice.experts,
        await Promise.all(choice.experts.map((e) => pkg.session(e.unet))),
        choice.weights,
      );
    case 'merge':
      return new MergeDenoiser(choice.experts, await pkg.mergedUnet(choice.experts, choice.weights), choice.weights);
    case 'fuse':
    case 'afa': {
      const ensemble = choice.ensemble!;
      if (ensemble.method !== choice.mode) {
        throw new EngineError('bad_request', `Ensemble "${ensemble.id}" is a ${ensemble.method} ensemble; run it with mode "${ensemble.method}".`);
      }
      const all = ensemble.experts.map((id) => pkg.expert(id));
      return new EnsembleDenoiser(ensemble, all, choice.experts, await pkg.session(ensemble.graph));
    }
  }
}
