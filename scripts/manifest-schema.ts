// Writes docs/manifest.schema.json from the zod schema in src/engine/manifest.ts (`npm run schema`);
// `--check` only says whether the committed file is up to date (exit 1 when not).
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { manifestJsonSchema } from '../src/engine/manifest.ts';

export const SCHEMA_FILE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../docs/manifest.schema.json');

/** The text docs/manifest.schema.json must hold. */
export function manifestSchemaText(): string {
  return `${JSON.stringify(manifestJsonSchema(), null, 2)}\n`;
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  const want = manifestSchemaText();
  let have = '';
  try {
    have = readFileSync(SCHEMA_FILE, 'utf8');
  } catch {
    // missing: written below, or reported stale by --check
  }
  if (process.argv.includes('--check')) {
    if (have !== want) {
      console.error(`${SCHEMA_FILE} is not what src/engine/manifest.ts generates: run npm run schema`);
      process.exit(1);
    }
    console.log(`${SCHEMA_FILE} is up to date`);
  } else if (have === want) {
    console.log(`${SCHEMA_FILE} is up to date`);
  } else {
    writeFileSync(SCHEMA_FILE, want);
    console.log(`wrote ${SCHEMA_FILE}`);
  }
}
