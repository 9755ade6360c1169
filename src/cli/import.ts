// `npm run import -- --out models/<name> [--name N] [--vae FILE] [--fp16|--fp32] [--force] [--allow-pickle]
//                    [--size N] [--steps N] [--cuda-fp16] [--check auto|require|off] A.safetensors B.safetensors dir/ …`
// SD1.x checkpoints → a model package (docs/import.md). A thin entry over the trainer's Python
// (`python3 -m trainer.importer`), which reads the checkpoints with PyTorch and exports the graphs; its
// progress goes to stdout, a refused import is one line on stderr and exit code 1.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
// Debian's python3 (or PYTHON), as the trainer's tests use: a pyenv/venv python3 first on PATH has no torch.
const python = process.env.PYTHON || '/usr/bin/python3';
// npm runs scripts in the package root; relative paths mean the folder the command was typed in.
const cwd = process.env.INIT_CWD || process.cwd();

const child = spawn(python, ['-m', 'trainer.importer', ...process.argv.slice(2)], {
  cwd,
  stdio: 'inherit',
  env: {
    ...process.env,
    PYTHONPATH: [REPO_ROOT, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter),
    OMP_WAIT_POLICY: process.env.OMP_WAIT_POLICY ?? 'PASSIVE',
  },
});
child.on('error', (err: NodeJS.ErrnoException) => {
  const why = err.code === 'ENOENT' ? 'not found' : err.message;
  process.stderr.write(
    `import failed: cannot run ${python} (${why}); set PYTHON to a Python 3 with torch and onnx (bash scripts/prerequisites.sh installs Debian's)\n`,
  );
  process.exit(1);
});
child.on('exit', (code, signal) => {
  if (signal) process.kill(process.pid, signal);
  process.exit(code === 0 ? 0 : code === 2 ? 2 : 1);
});
