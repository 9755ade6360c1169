// The import boundaries between the project's parts, checked on the real import graph of src/,
// test/, bench/ and scripts/: the engine knows nothing of Discord, the bot nothing of ONNX, lower
// layers never import upper ones, and test and bench code stay out of the product.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { isBuiltin } from 'node:module';
import path from 'node:path';
import ts from 'typescript';
import { REPO_ROOT } from './helpers/fixture.ts';

/** A part of the project: the files under `prefix` (the longest matching prefix wins). */
const PARTS = {
  engine: 'src/engine/',
  log: 'src/log/',
  'engine-host': 'src/engine-host/',
  queue: 'src/queue/',
  store: 'src/store/',
  distributed: 'src/distributed/',
  bot: 'src/bot/',
  'bot-commands': 'src/bot/commands/',
  cli: 'src/cli/',
  eval: 'src/eval/',
  testing: 'src/testing/',
  scripts: 'scripts/',
  bench: 'bench/',
  test: 'test/',
} as const;

type Part = keyof typeof PARTS;

const PRODUCT: Part[] = ['engine', 'log', 'engine-host', 'queue', 'store', 'distributed', 'bot', 'bot-commands', 'cli'];

/**
 * Which other parts each part may import. Layers, bottom up: engine and log; the engine host
 * (worker threads), queue, store; distributed (the GPU worker uses the engine host); bot, cli, eval.
 * eval (the demo evaluation) and testing (fakes for tests and benches) are imported by no product
 * part; nothing imports bench; src never imports test.
 */
const MAY_IMPORT: Record<Part, Part[]> = {
  engine: [],
  log: [],
  'engine-host': ['engine'],
  queue: [],
  store: ['engine'],
  distributed: ['engine', 'engine-host', 'log'],
  bot: ['bot-commands', 'engine', 'engine-host', 'queue', 'store', 'distributed', 'log'],
  'bot-commands': ['bot', 'engine'],
  cli: ['engine', 'engine-host', 'log'],
  eval: ['engine', 'engine-host', 'cli', 'log'],
  testing: [],
  scripts: [...PRODUCT],
  bench: [...PRODUCT, 'testing'],
  test: [...PRODUCT, 'eval', 'testing', 'scripts'],
};

/** Parts that some importers may enter only through a few files (and, optionally, only from a few files). */
const ENTRANCES: { into: Part; from: Part[]; through: string[]; by?: string[]; why: string }[] = [
  {
    into: 'engine',
    from: ['bot', 'bot-commands'],
    through: ['src/engine/api.ts', 'src/engine/labels.ts', 'src/engine/render/index.ts'],
    why: 'the bot knows nothing of ONNX: the engine API, the labels and PNG rendering only',
  },
  {
    into: 'bot-commands',
    from: ['bot'],
    through: ['src/bot/commands/index.ts'],
    by: ['src/bot/bot.ts', 'src/bot/deploy-commands.ts'],
    why: 'commands build on the bot; only the bot and the deploy script read the list of commands',
  },
];

/** Packages that only some parts may import (others are free for all). */
const PACKAGES: Record<string, Part[]> = {
  'onnxruntime-node': ['engine', 'test'],
  'discord.js': ['bot', 'bot-commands', 'bench', 'test'],
  bullmq: ['distributed', 'bench', 'test'],
  ioredis: ['distributed', 'bench', 'test'],
  'better-sqlite3': ['store', 'test'],
};

interface Edge {
  /** Repository-relative path of the importing file. */
  from: string;
  /** Repository-relative path of the imported file, or a package's name. */
  to: string;
  package?: true;
}

function partOf(file: string): Part | undefined {
  let best: Part | undefined;
  for (const [part, prefix] of Object.entries(PARTS) as [Part, string][]) {
    if (file.startsWith(prefix) && (!best || prefix.length > PARTS[best].length)) best = part;
  }
  return best;
}

function packageName(specifier: string): string {
  const segments = specifier.split('/');
  return specifier.startsWith('@') ? segments.slice(0, 2).join('/') : segments[0];
}

/** Every module specifier in a source text: imports, `export … from`, dynamic `import('…')`. */
function specifiersOf(source: string): string[] {
  return ts.preProcessFile(source, true, true).importedFiles.map((file) => file.fileName);
}

/** The edges out of one file, relative specifiers resolved against it; Node's built-ins are left out. */
function edgesOf(file: string, source: string): Edge[] {
  const edges: Edge[] = [];
  for (const specifier of specifiersOf(source)) {
    if (specifier.startsWith('.')) {
      edges.push({ from: file, to: path.posix.normalize(path.posix.join(path.posix.dirname(file), specifier)) });
    } else if (!isBuiltin(specifier)) {
      edges.push({ from: file, to: packageName(specifier), package: true });
    }
  }
  return edges;
}

/** Every forbidden edge, with the rule it breaks. */
function violations(edges: Edge[]): string[] {
  const found: string[] = [];
  for (const { from, to, package: isPackage } of edges) {
    const source = partOf(from);
    if (!source) {
      found.push(`${from} belongs to no part of the layering table`);
      continue;
    }
    if (isPackage) {
      const allowed = PACKAGES[to];
      if (allowed && !allowed.includes(source)) found.push(`${from} imports ${to}, which only ${allowed.join(', ')} may import`);
      continue;
    }
    const target = partOf(to);
    if (!target) {
      found.push(`${from} imports ${to}, outside every part of the layering table`);
      continue;
    }
    if (target !== source && !MAY_IMPORT[source].includes(target)) {
      found.push(`${from} (${source}) imports ${to} (${target}); ${source} may import ${MAY_IMPORT[source].join(', ') || 'nothing outside itself'}`);
      continue;
    }
    for (const entrance of ENTRANCES) {
      if (entrance.into !== target || !entrance.from.includes(source)) continue;
      if (!entrance.through.includes(to)) found.push(`${from} imports ${to}: ${source} may enter ${target} only through ${entrance.through.join(', ')} (${entrance.why})`);
      else if (entrance.by && !entrance.by.includes(from)) found.push(`${from} imports ${to}: only ${entrance.by.join(', ')} may (${entrance.why})`);
    }
  }
  return found;
}

function sourceFiles(dir: string): string[] {
  const absolute = path.join(REPO_ROOT, dir);
  return readdirSync(absolute, { recursive: true, encoding: 'utf8' })
    .filter((name) => /\.(ts|mts)$/.test(name) && !name.split(path.sep).includes('fixtures'))
    .map((name) => path.posix.join(dir, name.split(path.sep).join('/')));
}

function projectEdges(): { files: string[]; edges: Edge[] } {
  const files = ['src', 'test', 'bench', 'scripts'].flatMap(sourceFiles);
  return { files, edges: files.flatMap((file) => edgesOf(file, readFileSync(path.join(REPO_ROOT, file), 'utf8'))) };
}

test('the project keeps its import boundaries', () => {
  const { files, edges } = projectEdges();
  assert.ok(files.length > 100 && edges.length > 300, `only ${files.length} files and ${edges.length} imports found`);
  assert.deepEqual(violations(edges), []);
});

test("the bot's own thread never loads onnxruntime-node, even indirectly (the engine runs in a thread or on a GPU worker)", () => {
  const { edges } = projectEdges();
  const out = new Map<string, Edge[]>();
  for (const edge of edges) out.set(edge.from, [...(out.get(edge.from) ?? []), edge]);
  const start = [...out.keys()].filter((file) => file.startsWith(PARTS.bot));
  const seen = new Set(start);
  const via = new Map<string, string>();
  const queue = [...start];
  while (queue.length > 0) {
    const file = queue.shift()!;
    for (const edge of out.get(file) ?? []) {
      if (edge.package) {
        const chain = [file];
        while (via.has(chain[0])) chain.unshift(via.get(chain[0])!);
        assert.notEqual(edge.to, 'onnxruntime-node', `${chain.join(' -> ')} -> onnxruntime-node`);
      } else if (!seen.has(edge.to)) {
        seen.add(edge.to);
        via.set(edge.to, file);
        queue.push(edge.to);
      }
    }
  }
  assert.ok(seen.has('src/engine/api.ts'));
});

test('every part of the layering table has files, and every source file a part', () => {
  const { files } = projectEdges();
  for (const part of Object.keys(PARTS) as Part[]) assert.ok(files.some((file) => partOf(file) === part), `no file in ${part} (${PARTS[part]})`);
  assert.deepEqual(files.filter((file) => !partOf(file)), []);
});

test('specifiers come from imports, re-exports and dynamic imports, not from comments or strings', () => {
  const source = [
    "import type { A } from './a.ts';",
    'import {',
    '  b,',
    "} from '../b.ts';",
    "export * from './c.ts';",
    "export { d } from './d.ts';",
    "const e = await import('./e.ts');",
    "import './f.ts';",
    "// import g from './g.ts';",
    "const h = \"import h from './h.ts'\";",
    "import { Client } from 'discord.js';",
    "import { readFile } from 'node:fs/promises';",
  ].join('\n');
  assert.deepEqual(specifiersOf(source), ['./a.ts', '../b.ts', './c.ts', './d.ts', './e.ts', './f.ts', 'discord.js', 'node:fs/promises']);
  assert.deepEqual(edgesOf('src/bot/x.ts', source).map((edge) => edge.to), [
    'src/bot/a.ts',
    'src/b.ts',
    'src/bot/c.ts',
    'src/bot/d.ts',
    'src/bot/e.ts',
    'src/bot/f.ts',
    'discord.js',
  ]);
});

test('the checker finds forbidden edges in a synthetic graph', () => {
  const allowed: Edge[] = [
    { from: 'src/bot/job-service.ts', to: 'src/engine/api.ts' },
    { from: 'src/bot/messages.ts', to: 'src/engine/labels.ts' },
    { from: 'src/bot/main.ts', to: 'src/engine-host/engine-pool.ts' },
    { from: 'src/bot/bot.ts', to: 'src/bot/commands/index.ts' },
    { from: 'src/bot/commands/queue.ts', to: 'src/bot/messages.ts' },
    { from: 'src/engine/render/png.ts', to: 'sharp', package: true },
    { from: 'src/engine/onnx-session.ts', to: 'onnxruntime-node', package: true },
    { from: 'src/distributed/worker-main.ts', to: 'src/log/logger.ts' },
    { from: 'bench/bot.ts', to: 'src/testing/fake-discord.ts' },
    { from: 'test/eval.test.ts', to: 'src/eval/run.ts' },
  ];
  assert.deepEqual(violations(allowed), []);

  const forbidden: Edge[] = [
    { from: 'src/engine/pipeline.ts', to: 'src/bot/messages.ts' },
    { from: 'src/engine/render/png.ts', to: 'discord.js', package: true },
    { from: 'src/bot/result-render.ts', to: 'onnxruntime-node', package: true },
    { from: 'src/bot/job-service.ts', to: 'src/engine/pipeline.ts' },
    { from: 'src/distributed/worker-main.ts', to: 'src/bot/config.ts' },
    { from: 'src/store/job-store.ts', to: 'src/queue/fair-queue.ts' },
    { from: 'src/bot/interactions.ts', to: 'src/bot/commands/index.ts' },
    { from: 'src/bot/commands/imagine.ts', to: 'src/distributed/names.ts' },
    { from: 'src/cli/imagine.ts', to: 'src/eval/run.ts' },
    { from: 'src/bot/bot.ts', to: 'src/testing/fake-discord.ts' },
    { from: 'src/bot/bot.ts', to: 'test/support/bot-harness.ts' },
    { from: 'test/bot-main.test.ts', to: 'bench/bot.ts' },
    { from: 'bench/bot.ts', to: 'test/support/bot-harness.ts' },
    { from: 'src/worker/engine-thread.ts', to: 'src/engine/api.ts' },
  ];
  for (const edge of forbidden) assert.equal(violations([edge]).length, 1, `${edge.from} -> ${edge.to} should be refused`);
  assert.match(violations([forbidden[0]])[0], /src\/engine\/pipeline\.ts \(engine\) imports src\/bot\/messages\.ts \(bot\); engine may import nothing outside itself/);
});
