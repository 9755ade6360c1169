import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';
import { EngineError, SCHEDULER_NAMES } from './api.ts';

export const MANIFEST_FORMAT = 'ensemble-diffusion-package';
export const SUPPORTED_FORMAT_VERSIONS = [1];

// The one definition of manifest.json's structure. docs/manifest.schema.json is generated from it
// (`npm run schema`; test/manifest-schema.test.ts fails while the committed file differs) and
// trainer/export/manifest_schema.py validates against that file, so edit here, then regenerate. Every rule
// must survive z.toJSONSchema: a .refine() says what it checks again in .meta() (anyOf, uniqueItems)
// so that the JSON Schema has it too. Rules across fields live in crossFieldRules below (and in
// cross_field_problems in trainer/export/manifest_schema.py); that the files exist, in loadManifest.

/** Letters, digits, "_", "-", "." (no i flag: JSON Schema patterns carry no flags). */
const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;
const id = z.string().regex(ID_PATTERN, 'ids are letters, digits, "_", "-" or "."');
/** A path relative to the package folder. */
const relPath = z.string().min(1);
const positiveInt = z.number().int().positive();

const EXPERT_NEEDS = 'needs "unet" (a graph) or "path" (an Optimum SD folder)';

/** What a graph computes in: "fp32" (weights may be stored as float16 and cast inside) or "fp16". */
export const PRECISIONS = ['fp32', 'fp16'] as const;
export type Precision = (typeof PRECISIONS)[number];

const GRAPH_REF_NEEDS = 'must be a path, or {"fp32": path, "fp16": path} with at least one of the two';
const variantsObject = z
  .strictObject({
    fp32: relPath.optional().describe('the graph computing in float32 (its weights may be stored as float16 and cast inside it); for the CPU'),
    fp16: relPath
      .optional()
      .describe('the graph computing in float16 (float32 kept where needed: GroupNorm statistics, softmax, timestep embedding); for CUDA'),
  })
  .refine((v) => v.fp32 !== undefined || v.fp16 !== undefined, { message: GRAPH_REF_NEEDS })
  .meta({ anyOf: [{ required: ['fp32'] }, { required: ['fp16'] }], errorMessage: GRAPH_REF_NEEDS });
/**
 * A graph: a path (a graph computing in float32) or its precision variants; the engine picks "fp16"
 * under CUDA and "fp32" on the CPU when present, else the other one (docs/model-package.md).
 */
const graphRef = z.union([relPath, variantsObject], { error: GRAPH_REF_NEEDS }).meta({ id: 'graph', errorMessage: GRAPH_REF_NEEDS });
export type GraphRef = z.output<typeof graphRef>;

const expertSchema = z
  .strictObject({
    id,
    title: z.string().optional().describe('shown to users; default: the id capitalised'),
    description: z.string().default(''),
    path: relPath.optional().describe('an Optimum SD export folder: unet, text_encoder and tokenizer default to its own'),
    unet: graphRef.optional().describe('the U-Net graph'),
    text_encoder: graphRef.optional().describe("the expert's own text encoder; default: the package's"),
    tokenizer: relPath.optional().describe("the expert's own tokenizer folder; default: the package's"),
    architecture: z.string().optional().describe('equal tags = identical graph structure (mergeable)'),
  })
  .refine((e) => e.unet !== undefined || e.path !== undefined, { message: EXPERT_NEEDS })
  .meta({ anyOf: [{ required: ['unet'] }, { required: ['path'] }], errorMessage: EXPERT_NEEDS });

const ensembleSchema = z.strictObject({
  id,
  title: z.string().optional().describe('shown to users; default: the id capitalised'),
  description: z.string().default(''),
  method: z
    .enum(['afa', 'fuse'])
    .default('afa')
    .describe('afa: a trained SABW aggregator fuses the experts; fuse: a training-free per-pixel rule (feature variance) does'),
  experts: z
    .array(id)
    .min(2)
    .refine((ids) => new Set(ids).size === ids.length, { message: 'lists an expert twice' })
    .meta({ uniqueItems: true, description: "ids of listed experts, in the order of the graph's N axis" }),
  graph: graphRef.describe('the fused graph: all its experts and the aggregation rule, one session.run per step'),
  subsets: z
    .boolean()
    .default(false)
    .describe(
      'true: the graph takes expert_mask and was trained with expert dropout, so any subset of the experts runs on it; ' +
        'false (the default, as a graph without expert_mask): only all of them together',
    ),
});

const size = z.strictObject({ min: positiveInt, max: positiveInt });
const limitDefaults = { max_steps: 150, max_count: 4 };

const manifestObject = z.strictObject({
  format: z.literal(MANIFEST_FORMAT),
  format_version: z.literal(SUPPORTED_FORMAT_VERSIONS),
  name: z.string().min(1),
  version: z.string().default('0.0.0'),
  description: z.string().default(''),
  latent: z.strictObject({
    channels: positiveInt,
    downsample: positiveInt.describe('pixels per latent cell; sizes are multiples of it'),
    scale_factor: z.number().positive(),
  }),
  tokenizer: relPath.default('tokenizer').describe('folder with vocab.json and merges.txt'),
  text_encoder: graphRef.default('text_encoder/model.onnx'),
  vae_decoder: graphRef.default('vae_decoder/model.onnx'),
  vae_encoder: graphRef
    .optional()
    .describe('the VAE encoder graph, for image-to-image (e.g. vae_encoder/model.onnx); without it a package only draws from noise'),
  scheduler: relPath.default('scheduler/scheduler_config.json').describe('diffusers scheduler config'),
  defaults: z.strictObject({
    steps: z.number().int().min(1).max(1000),
    guidance: z.number().min(0).max(50),
    scheduler: z.enum(SCHEDULER_NAMES as [string, ...string[]]),
    width: positiveInt,
    height: positiveInt,
  }),
  size: size
    .optional()
    .describe('allowed image sides in pixels; default: [max(downsample, floor(natural / 2)), 2 * natural], natural = max(defaults.width, defaults.height)'),
  limits: z
    .strictObject({ max_steps: positiveInt.default(limitDefaults.max_steps), max_count: positiveInt.default(limitDefaults.max_count) })
    .default(limitDefaults),
  display: z.strictObject({ width: positiveInt, height: positiveInt }).optional().describe('upscale images to this for display'),
  experts: z.array(expertSchema).min(1),
  ensembles: z.array(ensembleSchema).default([]),
});

type Issue = { path: (string | number)[]; message: string };

/**
 * The manifest's rules across fields, which JSON Schema does not express; the same list as
 * cross_field_problems in trainer/export/manifest_schema.py. Runs on data of the right types.
 */
function crossFieldRules(m: z.output<typeof manifestObject>): Issue[] {
  const issues: Issue[] = [];
  const seen = new Set<string>();
  const ids: [string, (string | number)[]][] = [
    ...m.experts.map((e, k): [string, (string | number)[]] => [e.id, ['experts', k, 'id']]),
    ...m.ensembles.map((e, k): [string, (string | number)[]] => [e.id, ['ensembles', k, 'id']]),
  ];
  for (const [x, where] of ids) {
    if (seen.has(x)) issues.push({ path: where, message: `the id "${x}" is used twice` });
    seen.add(x);
  }
  const experts = new Set(m.experts.map((e) => e.id));
  m.ensembles.forEach((ens, k) =>
    ens.experts.forEach((x, j) => {
      if (!experts.has(x)) issues.push({ path: ['ensembles', k, 'experts', j], message: `names unknown expert "${x}"` });
    }),
  );
  const d = m.latent.downsample;
  if (m.size !== undefined) {
    if (m.size.min > m.size.max) issues.push({ path: ['size', 'min'], message: `${m.size.min} > size.max ${m.size.max}` });
    for (const k of ['min', 'max'] as const) {
      if (m.size[k] % d) issues.push({ path: ['size', k], message: `${m.size[k]} is not a multiple of latent.downsample ${d}` });
    }
  }
  for (const k of ['width', 'height'] as const) {
    const v = m.defaults[k];
    if (v % d) issues.push({ path: ['defaults', k], message: `${v} is not a multiple of latent.downsample ${d}` });
    if (m.size !== undefined && (v < m.size.min || v > m.size.max)) {
      issues.push({ path: ['defaults', k], message: `${v} is outside size [${m.size.min}, ${m.size.max}]` });
    }
  }
  return issues;
}

const manifestSchema = manifestObject
  .superRefine((m, ctx) => {
    for (const issue of crossFieldRules(m)) ctx.addIssue({ code: 'custom', ...issue });
  })
  .meta({
    title: 'manifest.json of an ensemble-diffusion model package (format_version 1)',
    description: 'See docs/model-package.md. Paths are relative to the package folder.',
    $comment:
      'Generated from src/engine/manifest.ts by `npm run schema`: edit there, not here. Not expressed here, ' +
      'and checked in code by both readers (crossFieldRules in src/engine/manifest.ts, cross_field_problems in ' +
      'trainer/export/manifest_schema.py): ids unique across experts and ensembles; an ensemble names listed experts; ' +
      'size.min <= size.max; size and defaults.width/height are multiples of latent.downsample; defaults inside size. ' +
      '"errorMessage" is an annotation: the message for its anyOf. Files and graphs are checked with the package at hand.',
  });

/** docs/manifest.schema.json: the JSON Schema (draft 2020-12) of what manifest.json may contain. */
export function manifestJsonSchema(): Record<string, unknown> {
  const { $schema, title, description, $comment, ...rules } = z.toJSONSchema(manifestSchema, {
    target: 'draft-2020-12',
    io: 'input',
    unrepresentable: 'throw',
  });
  return { $schema, title, description, $comment, ...rules };
}

/** `experts[0].id`: a zod issue path as the manifest's readers write it. */
export function fieldPath(at: readonly PropertyKey[]): string {
  let out = '';
  for (const key of at) out += typeof key === 'number' ? `[${key}]` : `${out ? '.' : ''}${String(key)}`;
  return out || '(root)';
}

/**
 * Validates parsed manifest.json content (structure, defaults, cross-field rules; no files) and
 * returns it with the schema's defaults applied. `source` names it in errors.
 */
export function parseManifest(json: unknown, source = 'manifest.json'): RawManifest {
  // A newer package fails on its version alone, not on every field that version changed.
  const head = typeof json === 'object' && json !== null ? (json as { format?: unknown; format_version?: unknown }) : {};
  const version = head.format_version;
  if (head.format === MANIFEST_FORMAT && typeof version === 'number' && !SUPPORTED_FORMAT_VERSIONS.includes(version)) {
    throw new EngineError(
      'bad_package',
      `${source} has format_version ${version}; this engine reads ${SUPPORTED_FORMAT_VERSIONS.join(', ')}.`,
    );
  }
  const parsed = manifestSchema.safeParse(json, {
    error: (issue) => (issue.code === 'invalid_type' && issue.input === undefined ? 'required' : undefined),
  });
  if (!parsed.success) {
    const problems = parsed.error.issues.map((i) => `${fieldPath(i.path)}: ${i.message}`);
    throw new EngineError('bad_package', `${source} is not a valid manifest:\n  ${problems.join('\n  ')}`);
  }
  return parsed.data;
}

export type RawManifest = z.infer<typeof manifestSchema>;

/** Where a graph is used; the warm-up and the error messages read it. */
export type GraphRole = 'text_encoder' | 'vae_decoder' | 'vae_encoder' | 'unet' | 'ensemble';

/** One graph of the package with the precision variant chosen for this engine. */
export interface GraphChoice {
  /** "expert \"a\" U-Net", "the text encoder", …: for messages. */
  what: string;
  role: GraphRole;
  /** Absolute path of the chosen variant. */
  path: string;
  precision: Precision;
  /** Every variant the manifest names, absolute. */
  variants: Partial<Record<Precision, string>>;
}

export interface ExpertEntry {
  id: string;
  title: string;
  description: string;
  /** Absolute path of the chosen variant of the U-Net (see Manifest.graphs for its precision). */
  unet: string;
  /** Absolute path of this expert's own text encoder; undefined = the package's. */
  textEncoder?: string;
  tokenizer?: string;
  architecture?: string;
}

export interface EnsembleEntry {
  id: string;
  title: string;
  description: string;
  method: 'afa' | 'fuse';
  experts: string[];
  graph: string;
  subsets: boolean;
}

export interface Manifest {
  dir: string;
  name: string;
  version: string;
  description: string;
  latent: { channels: number; downsample: number; scaleFactor: number };
  tokenizer: string;
  textEncoder: string;
  vaeDecoder: string;
  /** Absolute path of the VAE encoder graph; undefined: no image-to-image. */
  vaeEncoder?: string;
  schedulerConfig: string;
  defaults: RawManifest['defaults'];
  size: { min: number; max: number };
  limits: { maxSteps: number; maxCount: number };
  display?: { width: number; height: number };
  experts: ExpertEntry[];
  ensembles: EnsembleEntry[];
  /** The precision asked for (loadManifest's `precision`). */
  precision: Precision;
  /** Every graph reference of the manifest, resolved (a file shared by several entries appears for each). */
  graphs: GraphChoice[];
  /** Graphs that had no variant in the asked precision and use the other one. */
  fallbacks: GraphChoice[];
}

export interface LoadManifestOptions {
  /** The precision variant to prefer (default "fp32"); a graph without it uses the other one. */
  precision?: Precision;
}

function titleOf(idValue: string, title?: string): string {
  return title ?? idValue.charAt(0).toUpperCase() + idValue.slice(1);
}

/** A graph reference's variants: a plain path is a graph computing in float32. */
export function graphVariants(ref: GraphRef): Partial<Record<Precision, string>> {
  return typeof ref === 'string' ? { fp32: ref } : { ...ref };
}

/** The variant of `ref` to use for `precision`: that one when the reference has it, else the other. */
export function pickVariant(ref: GraphRef, precision: Precision): { path: string; precision: Precision } {
  const variants = graphVariants(ref);
  const other: Precision = precision === 'fp32' ? 'fp16' : 'fp32';
  const chosen = variants[precision] !== undefined ? precision : other;
  return { path: variants[chosen]!, precision: chosen };
}

/**
 * Reads, validates and resolves a package's manifest.json; every path becomes absolute and every
 * graph reference the variant for `options.precision` (docs/model-package.md, "Precision").
 */
export async function loadManifest(dir: string, options: LoadManifestOptions = {}): Promise<Manifest> {
  const root = path.resolve(dir);
  const precision = options.precision ?? 'fp32';
  const file = path.join(root, 'manifest.json');
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch {
    throw new EngineError('bad_package', `No model package at ${root}: ${file} is missing.`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new EngineError('bad_package', `${file} is not valid JSON: ${(err as Error).message}`);
  }
  const m = parseManifest(json, file);
  const abs = (p: string) => path.resolve(root, p);
  const graphs: GraphChoice[] = [];
  const graph = (ref: GraphRef, role: GraphRole, what: string): string => {
    const variants = Object.fromEntries(Object.entries(graphVariants(ref)).map(([k, v]) => [k, abs(v)]));
    const chosen = pickVariant(ref, precision);
    graphs.push({ what, role, path: abs(chosen.path), precision: chosen.precision, variants });
    return abs(chosen.path);
  };
  const experts: ExpertEntry[] = m.experts.map((e) => {
    const base = e.path !== undefined ? abs(e.path) : undefined;
    const what = `expert "${e.id}"`;
    const textEncoder =
      e.text_encoder !== undefined
        ? graph(e.text_encoder, 'text_encoder', `${what} text encoder`)
        : base
          ? graph(path.join(base, 'text_encoder', 'model.onnx'), 'text_encoder', `${what} text encoder`)
          : undefined;
    return {
      id: e.id,
      title: titleOf(e.id, e.title),
      description: e.description,
      unet: graph(e.unet ?? path.join(base!, 'unet', 'model.onnx'), 'unet', `${what} U-Net`),
      textEncoder,
      tokenizer: e.tokenizer !== undefined ? abs(e.tokenizer) : base ? path.join(base, 'tokenizer') : undefined,
      architecture: e.architecture,
    };
  });
  const multiple = m.latent.downsample;
  const natural = Math.max(m.defaults.width, m.defaults.height);
  const size = m.size ?? { min: Math.max(multiple, Math.floor(natural / 2)), max: natural * 2 };
  const manifest: Manifest = {
    dir: root,
    name: m.name,
    version: m.version,
    description: m.description,
    latent: { channels: m.latent.channels, downsample: m.latent.downsample, scaleFactor: m.latent.scale_factor },
    tokenizer: abs(m.tokenizer),
    textEncoder: graph(m.text_encoder, 'text_encoder', 'text encoder'),
    vaeDecoder: graph(m.vae_decoder, 'vae_decoder', 'VAE decoder'),
    vaeEncoder: m.vae_encoder !== undefined ? graph(m.vae_encoder, 'vae_encoder', 'VAE encoder') : undefined,
    schedulerConfig: abs(m.scheduler),
    defaults: m.defaults,
    size,
    limits: { maxSteps: m.limits.max_steps, maxCount: m.limits.max_count },
    display: m.display,
    experts,
    ensembles: m.ensembles.map((e) => ({
      ...e,
      graph: graph(e.graph, 'ensemble', `ensemble "${e.id}" graph`),
      title: titleOf(e.id, e.title),
    })),
    precision,
    graphs,
    fallbacks: graphs.filter((g) => g.precision !== precision),
  };
  await checkFilesExist(manifest);
  await unifySharedFiles(manifest);
  return manifest;
}

/** The precision of the graph at `file` (a path from this manifest), or undefined for another file. */
export function precisionOf(m: Manifest, file: string): Precision | undefined {
  return m.graphs.find((g) => g.path === file)?.precision;
}

async function checkFilesExist(m: Manifest): Promise<void> {
  const files: [string, string][] = [
    ['tokenizer vocab', path.join(m.tokenizer, 'vocab.json')],
    ['tokenizer merges', path.join(m.tokenizer, 'merges.txt')],
    ['scheduler config', m.schedulerConfig],
    ...m.graphs.flatMap((g) =>
      Object.entries(g.variants).map(([p, file]): [string, string] => [
        Object.keys(g.variants).length > 1 || p !== 'fp32' ? `${g.what} (${p})` : g.what,
        file,
      ]),
    ),
  ];
  const missing: string[] = [];
  const seen = new Set<string>();
  for (const [what, file] of files) {
    if (seen.has(file)) continue;
    seen.add(file);
    try {
      const s = await stat(file);
      if (!s.isFile()) missing.push(`${what}: ${file} is not a file`);
    } catch {
      missing.push(`${what}: ${file}`);
    }
  }
  if (missing.length > 0) {
    throw new EngineError('bad_package', `The model package at ${m.dir} is missing files:\n  ${missing.join('\n  ')}`);
  }
}

/**
 * Graph paths that name one file (a symbolic or hard link, e.g. an Optimum folder's text encoder
 * linked to the package's) become one string, so that the engine opens that file once and encodes a
 * prompt once for every expert that uses it.
 */
async function unifySharedFiles(m: Manifest): Promise<void> {
  const byIdentity = new Map<string, string>();
  const canonical = new Map<string, string>();
  for (const g of m.graphs) {
    if (canonical.has(g.path)) continue;
    const s = await stat(g.path);
    const identity = `${s.dev}:${s.ino}`;
    const first = byIdentity.get(identity) ?? g.path;
    byIdentity.set(identity, first);
    canonical.set(g.path, first);
  }
  const same = (file: string) => canonical.get(file) ?? file;
  for (const g of m.graphs) g.path = same(g.path);
  m.textEncoder = same(m.textEncoder);
  m.vaeDecoder = same(m.vaeDecoder);
  if (m.vaeEncoder !== undefined) m.vaeEncoder = same(m.vaeEncoder);
  for (const e of m.experts) {
    e.unet = same(e.unet);
    if (e.textEncoder !== undefined) e.textEncoder = same(e.textEncoder);
  }
  for (const e of m.ensembles) e.graph = same(e.graph);
}
