// The command-line tools, run as a person runs them.
import assert from 'node:assert/strict';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import sharp from 'sharp';
import { parseParameters, readPngText } from '../src/engine/render/index.ts';
import { REPO_ROOT, TINY } from './helpers/fixture.ts';
import { runCli } from './helpers/cli.ts';


test('imagine --json writes PNGs with A1111 parameters, contribution panels and raw maps', async () => {
  const out = await mkdtemp(path.join(os.tmpdir(), 'imagine-'));
  const r = await runCli('imagine.ts', ['a red circle on the left', '--ensemble', 'duo', '--seed', '42', '--steps', '6', '--count', '2', '--contributions', '--compare', '--out', out, '--json']);
  assert.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout.trim().split('\n').pop()!);
  assert.deepEqual(report.images.map((i: { seed: number }) => i.seed), [42, 43]);
  const png = await readFile(report.images[1].path);
  const params = parseParameters(readPngText(png).parameters);
  assert.equal(params.prompt, 'a red circle on the left');
  assert.equal(params.seed, 43);
  assert.equal(params.steps, 6);
  assert.equal(params.mode, 'afa');
  assert.equal(report.contributions.length, 2);
  const shares = report.contributions[0].shares;
  assert.ok(Math.abs(shares.alpha + shares.beta - 1) < 1e-6);
  const maps = JSON.parse(await readFile(report.contributions[0].maps, 'utf8'));
  assert.deepEqual(maps.experts, ['alpha', 'beta']);
  assert.equal(maps.weights[0].length, maps.width * maps.height);
  assert.equal(report.compare.length, 1);
  await readFile(report.compare[0].path);
});

test('imagine --prompts generates one image per line, models loaded once', async () => {
  const out = await mkdtemp(path.join(os.tmpdir(), 'imagine-'));
  const file = path.join(out, 'prompts.txt');
  await writeFile(file, 'a red circle\n\na blue square\n');
  const r = await runCli('imagine.ts', ['--prompts', file, '--experts', 'alpha,beta', '--mode', 'merge', '--seed', '1', '--steps', '3', '--out', out, '--json']);
  assert.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout.trim().split('\n').pop()!);
  assert.deepEqual(report.images.map((i: { prompt: string }) => i.prompt), ['a red circle', 'a blue square']);
});

test('bad input exits with a one-line message, no stack trace', async () => {
  const cases: [string[], RegExp][] = [
    [['x', '--experts', 'gamma'], /Unknown expert "gamma"\. Available experts: alpha, beta, odd/],
    [['x', '--steps', 'many'], /--steps must be a number/],
    [['x', '--seed', '1.5'], /Seed must be a whole number/],
    [['x', '--scheduler', 'plms'], /--scheduler must be one of/],
    [['x', '--model-dir', '/nonexistent'], /No model package at \/nonexistent/],
    [[], /Give a prompt/],
    [['x', '--bogus'], /Unknown option '--bogus'/],
  ];
  for (const [args, pattern] of cases) {
    const r = await runCli('imagine.ts', args);
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, pattern);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
  }
});

test('imagine --image starts from a picture of any size (fitted to the size drawn), --strength sets how much is redrawn', async () => {
  const out = await mkdtemp(path.join(os.tmpdir(), 'imagine-'));
  const picture = path.join(out, 'start.png');
  // 50×40 with transparency: scaled to cover 32×32, centre-cropped, flattened onto white
  await sharp({ create: { width: 50, height: 40, channels: 4, background: { r: 200, g: 30, b: 30, alpha: 0.5 } } }).png().toFile(picture);
  const r = await runCli('imagine.ts', ['a red circle', '--experts', 'alpha', '--seed', '4', '--steps', '6', '--image', picture, '--strength', '0.5', '--out', out, '--json']);
  assert.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout.trim().split('\n').pop()!);
  const params = parseParameters(readPngText(await readFile(report.images[0].path)).parameters);
  assert.equal(params.strength, 0.5);
  assert.equal(params.steps, 6);
  assert.equal(params.width, 32);
  const again = await runCli('imagine.ts', ['a red circle', '--experts', 'alpha', '--seed', '4', '--steps', '6', '--image', picture, '--strength', '0.5', '--out', path.join(out, 'again'), '--json']);
  const first = await sharp(report.images[0].path).raw().toBuffer();
  const second = await sharp(JSON.parse(again.stdout.trim().split('\n').pop()!).images[0].path).raw().toBuffer();
  assert.ok(first.equals(second), 'same seed, same picture');

  const errors: [string[], RegExp][] = [
    [['x', '--strength', '0.5'], /--strength needs --image/],
    [['x', '--image', path.join(out, 'missing.png')], /Cannot read the image .*missing\.png/],
    [['x', '--image', picture, '--strength', '1.5'], /Strength must be greater than 0 and at most 1/],
    [['x', '--image', picture, '--strength', 'lots'], /--strength must be a number/],
  ];
  for (const [args, pattern] of errors) {
    const e = await runCli('imagine.ts', args);
    assert.equal(e.code, 2, `${args.join(' ')}: ${e.stderr}`);
    assert.match(e.stderr, pattern);
  }
});

test('models lists experts and ensembles; tokenize prints ids', async () => {
  const models = await runCli('models.ts', []);
  assert.equal(models.code, 0, models.stderr);
  assert.match(models.stdout, /alpha/);
  assert.match(models.stdout, /duo .*alpha \+ beta/);
  const tok = await runCli('tokenize.ts', ['--tokenizer', path.join(TINY, 'tokenizer'), 'a red circle']);
  assert.equal(tok.code, 0, tok.stderr);
  const out = JSON.parse(tok.stdout);
  assert.equal(out.input_ids.length, 77);
  assert.equal(out.truncated, false);
  assert.ok(out.ids.length >= 3);
});
