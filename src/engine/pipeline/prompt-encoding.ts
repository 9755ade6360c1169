// The prompt and the negative prompt → text embeddings, once per distinct text encoder of the chosen experts.
import type { Conditioning } from '../denoisers.ts';
import type { ModelPackage } from '../model-package.ts';
import type { FloatTensor } from '../onnx-session.ts';
import type { ResolvedRequest } from '../resolve.ts';

/** CLIP's context length: BOS, up to 75 prompt tokens, EOS and padding. */
export const MAX_TOKENS = 77;

export interface PromptEmbeddings {
  /** Each expert's [uncond; cond] pair (2 rows), keyed by expert id; experts sharing an encoder share the pair. */
  byExpert: Map<string, Conditioning>;
  /** Prompt words that did not fit into the context (from the package's own tokenizer when it is used). */
  truncatedWords: string[];
}

export async function encodePrompt(pkg: ModelPackage, req: ResolvedRequest): Promise<PromptEmbeddings> {
  const m = pkg.manifest;
  const byEncoder = new Map<string, Promise<Conditioning>>();
  let truncatedWords: string[] = [];
  const encode = async (encoderFile: string, tokenizerDir: string): Promise<Conditioning> => {
    const tokenizer = await pkg.tokenizer(tokenizerDir);
    const cond = tokenizer.tokenize(req.prompt);
    const uncond = tokenizer.tokenize(req.negative);
    if (tokenizerDir === m.tokenizer || truncatedWords.length === 0) truncatedWords = cond.droppedWords;
    const session = await pkg.session(encoderFile);
    session.require(['input_ids']);
    const ids = new Float32Array(2 * MAX_TOKENS);
    ids.set(uncond.inputIds, 0);
    ids.set(cond.inputIds, MAX_TOKENS);
    const out = await session.run({ input_ids: session.tensor('input_ids', { data: ids, dims: [2, MAX_TOKENS] }) });
    const hidden = out.last_hidden_state ?? Object.values(out)[0];
    // Attention covers BOS, the words and the first EOS; the padding after it is masked out.
    const mask = new Float32Array(2 * MAX_TOKENS);
    [uncond.inputIds, cond.inputIds].forEach((row, r) => {
      const eos = row.indexOf(tokenizer.eosId, 1);
      mask.fill(1, r * MAX_TOKENS, r * MAX_TOKENS + (eos < 0 ? MAX_TOKENS : eos + 1));
    });
    return { hidden, pooled: out.pooler_output, mask: { data: mask, dims: [2, MAX_TOKENS] } };
  };
  const byExpert = new Map<string, Conditioning>();
  for (const e of req.experts) {
    const encoderFile = e.textEncoder ?? m.textEncoder;
    const tokenizerDir = e.tokenizer ?? m.tokenizer;
    const key = `${encoderFile}\n${tokenizerDir}`;
    if (!byEncoder.has(key)) byEncoder.set(key, encode(encoderFile, tokenizerDir));
    byExpert.set(e.id, await byEncoder.get(key)!);
  }
  return { byExpert, truncatedWords };
}

/** The user-facing warning for a prompt that was cut, or none. */
export function truncationWarnings(truncatedWords: string[]): string[] {
  if (truncatedWords.length === 0) return [];
  return [`The prompt is longer than ${MAX_TOKENS - 2} tokens; these words were dropped: ${truncatedWords.join(' ')}`];
}

/**
 * [uncond; cond] pairs → one row per model-batch row: uncond×B then cond×B with guidance, cond×B
 * without. Done once per generation, so that every step reuses the same tensors.
 */
export function repeatForBatch(pairs: Map<string, Conditioning>, batch: number, guided: boolean): Map<string, Conditioning> {
  const rows = guided ? 2 * batch : batch;
  const repeat = (pair: FloatTensor): FloatTensor => {
    const row = pair.data.length / 2;
    const data = new Float32Array(rows * row);
    for (let r = 0; r < rows; r++) {
      const src = guided && r < batch ? 0 : row;
      data.set(pair.data.subarray(src, src + row), r * row);
    }
    return { data, dims: [rows, ...pair.dims.slice(1)] };
  };
  // Experts that shared a pair share its rows too: the merge denoiser takes identical conditioning
  // as one text encoder (and only mixes embeddings when they differ).
  const done = new Map<Conditioning, Conditioning>();
  const out = new Map<string, Conditioning>();
  for (const [id, pair] of pairs) {
    let repeated = done.get(pair);
    if (!repeated) {
      repeated = { hidden: repeat(pair.hidden), pooled: pair.pooled && repeat(pair.pooled), mask: pair.mask && repeat(pair.mask) };
      done.set(pair, repeated);
    }
    out.set(id, repeated);
  }
  return out;
}
