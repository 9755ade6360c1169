// One manifest schema: the zod reader (src/engine/manifest.ts) accepts and rejects the same examples as
// trainer/export/manifest_schema.py (trainer/tests/export/test_manifest_schema.py runs over the same folder), fills in
// the same defaults, and docs/manifest.schema.json is what the zod schema generates.
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { EngineError } from '../src/engine/api.ts';
import { fieldPath, parseManifest } from '../src/engine/manifest.ts';
import { manifestSchemaText, SCHEMA_FILE } from '../scripts/manifest-schema.ts';
import { REPO_ROOT } from './helpers/fixture.ts';

const EXAMPLES = path.join(REPO_ROOT, 'test/fixtures/manifest');
const readJson = (file: string): unknown => JSON.parse(readFileSync(file, 'utf8'));
const examples = (kind: 'valid' | 'invalid') =>
  readdirSync(path.join(EXAMPLES, kind))
    .filter((f) => f.endsWith('.json') && f !== 'reasons.json')
    .sort();
const reasons = readJson(path.join(EXAMPLES, 'invalid/reasons.json')) as Record<string, { reason: string; mentions: string | null }>;

function problemsOf(json: unknown): string | undefined {
  try {
    parseManifest(json, 'example');
    return undefined;
  } catch (err) {
    assert.ok(err instanceof EngineError && err.code === 'bad_package', `expected a bad_package EngineError, got ${String(err)}`);
    return err.message;
  }
}

describe('manifest schema', () => {
  test('docs/manifest.schema.json is what src/engine/manifest.ts generates (npm run schema)', () => {
    const have = existsSync(SCHEMA_FILE) ? readFileSync(SCHEMA_FILE, 'utf8') : '';
    assert.ok(have === manifestSchemaText(), `${SCHEMA_FILE} is stale: run npm run schema and commit it`);
  });

  test('there are examples, and every invalid one has its reason', () => {
    assert.ok(examples('valid').length >= 4);
    assert.ok(examples('invalid').length >= 10);
    assert.deepEqual(examples('invalid'), Object.keys(reasons).sort());
  });

  for (const name of examples('valid')) {
    test(`accepts valid/${name}`, () => {
      const problems = problemsOf(readJson(path.join(EXAMPLES, 'valid', name)));
      assert.equal(problems, undefined);
    });
  }

  for (const real of ['models/demo/manifest.json', 'test/fixtures/tiny/manifest.json']) {
    test(`accepts the real ${real}`, { skip: !existsSync(path.join(REPO_ROOT, real)) }, () => {
      assert.equal(problemsOf(readJson(path.join(REPO_ROOT, real))), undefined);
    });
  }

  for (const name of examples('invalid')) {
    test(`rejects invalid/${name}: ${reasons[name]?.reason}`, () => {
      const problems = problemsOf(readJson(path.join(EXAMPLES, 'invalid', name)));
      assert.ok(problems !== undefined, 'accepted');
      const mentions = reasons[name]?.mentions;
      if (mentions) assert.ok(problems.includes(mentions), `the error does not name ${mentions}:\n${problems}`);
    });
  }

  test('fills in the defaults that with-defaults.json lists (as trainer/export/manifest_schema.py does)', () => {
    const want = readJson(path.join(EXAMPLES, 'with-defaults.json')) as Record<string, unknown>;
    assert.ok(Object.keys(want).length > 0);
    for (const [name, full] of Object.entries(want)) {
      assert.deepEqual(parseManifest(readJson(path.join(EXAMPLES, 'valid', name))), full, name);
    }
  });

  test('an ensemble without "subsets" is not promised to run on a subset', () => {
    const m = parseManifest(readJson(path.join(EXAMPLES, 'valid/minimal.json')));
    assert.equal(m.ensembles[0].subsets, false);
  });

  test('errors name the field: one line per problem', () => {
    const json = readJson(path.join(EXAMPLES, 'valid/minimal.json')) as Record<string, any>;
    json.defaults.steps = 0;
    json.experts[1].id = 'b c';
    assert.throws(() => parseManifest(json, 'x/manifest.json'), (err: Error) => {
      const lines = err.message.split('\n');
      assert.equal(lines[0], 'x/manifest.json is not a valid manifest:');
      assert.match(lines.find((l) => l.includes('defaults.steps')) ?? '', /^ {2}defaults\.steps: /);
      assert.match(lines.find((l) => l.includes('experts[1].id')) ?? '', /^ {2}experts\[1\]\.id: ids are letters/);
      return true;
    });
    json.defaults.steps = 8;
    json.experts[1].id = 'b';
    json.format_version = 2;
    assert.throws(() => parseManifest(json, 'x/manifest.json'), /x\/manifest\.json has format_version 2; this engine reads 1\./);
    assert.equal(fieldPath([]), '(root)');
    assert.equal(fieldPath(['ensembles', 0, 'experts', 1]), 'ensembles[0].experts[1]');
  });
});
