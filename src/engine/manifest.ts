import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';
import { EngineError, SCHEDULER_NAMES } from './api.ts';

export const MANIFEST_FORMAT = 'ensemble-diffusion-package';
export const SUPPORTED_FORMAT_VERSIONS = [1];

const id = z.string().regex(/^[a-z0-9][a-z0-9_.-]*$/i, 'ids are letters, digits, "_", "-" or "."');

const expertSchema = z
  .object({
    id,
    title: z.string().optional(),
    description: z.string().default(''),
    path: z.string().optional(),
    unet: z.string().optional(),
    text_encoder: z.string().optional(),
    tokenizer: z.string().optional(),
    architecture: z.string().optional(),
  })
  .refine((e) => e.unet !== undefined || e.path !== undefined, {
    message: 'an expert needs "unet" (a graph) or "path" (an Optimum SD folder)',
  });

const ensembleSchema = z.object({
  id,
  title: z.string().optional(),
  description: z.string().default(''),
  method: z.literal('afa').default('afa'),
  experts: z.array(id).min(2),
  graph: z.string(),
  subsets: z.boolean().default(false),
});

const manifestSchema = z.object({
  format: z.literal(MANIFEST_FORMAT),
  format_version: z.number().int(),
  name: z.string().min(1),
  version: z.string().default('0.0.0'),
  description: z.string().default(''),
  latent: z.object({
    channels: z.number().int().positive(),
    downsample: z.number().int().positive(),
    scale_factor: z.number().positive(),
  }),
  tokenizer: z.string().default('tokenizer'),
  text_encoder: z.string().default('text_encoder/model.onnx'),
  vae_decoder: z.string().default('vae_decoder/model.onnx'),
  scheduler: z.string().default('scheduler/scheduler_config.json'),
  defaults: z.object({
    steps: z.number().int().min(1).max(1000),
    guidance: z.number().min(0).max(50),
    scheduler: z.enum(SCHEDULER_NAMES as [string, ...string[]]),
    width: z.number().int().positive(),
    height: z.number().int().positive(),
  }),
  size: z
    .object({ min: z.number().int().positive(), max: z.number().int().positive() })
    .optional(),
  limits: z
    .object({ max_steps: z.number().int().positive().default(150), max_count: z.number().int().positive().default(4) })
    .default({ max_steps: 150, max_count: 4 }),
  display: z.object({ width: z.number().int().positive(), height: z.number().int().positive() }).optional(),
  experts: z.array(expertSchema).min(1),
  ensembles: z.array(ensembleSchema).default([]),
});

export type RawManifest = z.infer<typeof manifestSchema>;

export interface ExpertEntry {
  id: string;
  title: string;
  description: string;
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
  method: 'afa';
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
  schedulerConfig: string;
  defaults: RawManifest['defaults'];
  size: { min: number; max: number };
  limits: { maxSteps: number; maxCount: number };
  display?: { width: number; height: number };
  experts: ExpertEntry[];
  ensembles: EnsembleEntry[];
}

function titleOf(idValue: string, title?: string): string {
  return title ?? idValue.charAt(0).toUpperCase() + idValue.slice(1);
}

/** Reads, validates and resolves a package's manifest.json; every path becomes absolute. */
export async function loadManifest(dir: string): Promise<Manifest> {
  const root = path.resolve(dir);
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
  const parsed = manifestSchema.safeParse(json);
  if (!parsed.success) {
    const problems = parsed.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`);
    throw new EngineError('bad_package', `${file} is not a valid manifest:\n  ${problems.join('\n  ')}`);
  }
  const m = parsed.data;
  if (!SUPPORTED_FORMAT_VERSIONS.includes(m.format_version)) {
    throw new EngineError(
      'bad_package',
      `${file} has format_version ${m.format_version}; this engine reads ${SUPPORTED_FORMAT_VERSIONS.join(', ')}.`,
    );
  }
  const abs = (p: string) => path.resolve(root, p);
  const experts: ExpertEntry[] = m.experts.map((e) => {
    const base = e.path !== undefined ? abs(e.path) : undefined;
    return {
      id: e.id,
      title: titleOf(e.id, e.title),
      description: e.description,
      unet: e.unet !== undefined ? abs(e.unet) : path.join(base!, 'unet', 'model.onnx'),
      textEncoder:
        e.text_encoder !== undefined ? abs(e.text_encoder) : base ? path.join(base, 'text_encoder', 'model.onnx') : undefined,
      tokenizer: e.tokenizer !== undefined ? abs(e.tokenizer) : base ? path.join(base, 'tokenizer') : undefined,
      architecture: e.architecture,
    };
  });
  const seen = new Set<string>();
  for (const x of [...experts.map((e) => e.id), ...m.ensembles.map((e) => e.id)]) {
    if (seen.has(x)) throw new EngineError('bad_package', `${file}: the id "${x}" is used twice.`);
    seen.add(x);
  }
  for (const ens of m.ensembles) {
    for (const x of ens.experts) {
      if (!experts.some((e) => e.id === x)) {
        throw new EngineError('bad_package', `${file}: ensemble "${ens.id}" names unknown expert "${x}".`);
      }
    }
  }
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
    textEncoder: abs(m.text_encoder),
    vaeDecoder: abs(m.vae_decoder),
    schedulerConfig: abs(m.scheduler),
    defaults: m.defaults,
    size,
    limits: { maxSteps: m.limits.max_steps, maxCount: m.limits.max_count },
    display: m.display,
    experts,
    ensembles: m.ensembles.map((e) => ({ ...e, graph: abs(e.graph), title: titleOf(e.id, e.title) })),
  };
  await checkFilesExist(manifest);
  return manifest;
}

async function checkFilesExist(m: Manifest): Promise<void> {
  const files: [string, string][] = [
    ['tokenizer vocab', path.join(m.tokenizer, 'vocab.json')],
    ['tokenizer merges', path.join(m.tokenizer, 'merges.txt')],
    ['text encoder', m.textEncoder],
    ['VAE decoder', m.vaeDecoder],
    ['scheduler config', m.schedulerConfig],
    ...m.experts.map((e): [string, string] => [`expert "${e.id}" U-Net`, e.unet]),
    ...m.ensembles.map((e): [string, string] => [`ensemble "${e.id}" graph`, e.graph]),
  ];
  const missing: string[] = [];
  for (const [what, file] of files) {
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
