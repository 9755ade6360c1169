// Before a CUDA session is created: are onnxruntime-node's CUDA provider libraries installed, and can
// the dynamic loader find the CUDA and cuDNN libraries they need? onnxruntime itself only says
// "Failed to load shared library" (the reason goes to its log), so the engine looks first and names
// what is missing, with the line that installs it. explainCudaFailure turns onnxruntime's own CUDA
// errors (driver too old, no GPU, …) into such messages too.
import { execFileSync } from 'node:child_process';
import { existsSync, openSync, readSync, closeSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

/** The provider libraries onnxruntime-node's installer puts beside onnxruntime_binding.node. */
export const PROVIDER_LIBRARIES = ['libonnxruntime_providers_shared.so', 'libonnxruntime_providers_cuda.so'];

/**
 * What the CUDA provider of onnxruntime 1.27 and later (onnxruntime-node 1.30 here) needs: CUDA 13 and
 * cuDNN 9. Used when the provider library is there but its ELF header cannot be read; otherwise its
 * own DT_NEEDED list says which libraries it links. cuDNN is opened at run time, so it is always added.
 */
export const CUDA_LIBRARIES_FALLBACK = ['libcudart.so.13', 'libcublas.so.13', 'libcublasLt.so.13', 'libcurand.so.10'];
export const RUNTIME_LOADED = ['libcudnn.so.9'];

/** onnxruntime-node's installer flag (script/install-metadata.js of 1.30 calls its CUDA manifest "cuda12"; the files target CUDA 13). */
export const INSTALL_PROVIDER =
  'ONNXRUNTIME_NODE_INSTALL=cuda12 npm rebuild onnxruntime-node   (fetches libonnxruntime_providers_{cuda,shared}.so ' +
  'of Microsoft.ML.OnnxRuntime.Gpu.Linux from nuget.org into node_modules/onnxruntime-node/bin/napi-v6/linux/x64/)';
export const INSTALL_CUDA =
  'sudo apt install cuda-libraries-13-0 libcudnn9-cuda-13   (NVIDIA\'s CUDA apt repository), or ' +
  'pip install "nvidia-cuda-runtime==13.*" "nvidia-cublas==13.*" "nvidia-curand==10.*" "nvidia-cufft==12.*" "nvidia-cudnn-cu13==9.*" ' +
  'and add their site-packages/nvidia/*/lib folders to LD_LIBRARY_PATH';

/** Where the system's libraries usually are, besides LD_LIBRARY_PATH and ld.so.cache. */
export const STANDARD_LIBRARY_DIRS = [
  '/lib',
  '/usr/lib',
  '/lib64',
  '/usr/lib64',
  '/lib/x86_64-linux-gnu',
  '/usr/lib/x86_64-linux-gnu',
  '/usr/local/lib',
  '/usr/local/cuda/lib64',
  '/usr/local/cuda/targets/x86_64-linux/lib',
];

/** The folder of onnxruntime_binding.node in the installed onnxruntime-node. */
export function ortBinaryDir(): string {
  const main = createRequire(import.meta.url).resolve('onnxruntime-node'); // …/onnxruntime-node/dist/index.js
  return path.join(path.dirname(main), '..', 'bin', 'napi-v6', process.platform, process.arch);
}

export interface ElfDynamic {
  needed: string[];
  /** DT_RUNPATH, else DT_RPATH, split at ':' (may hold $ORIGIN). */
  runpath: string[];
}

/**
 * DT_NEEDED and DT_RUNPATH of a 64-bit little-endian ELF shared library, reading only its headers and
 * dynamic section (the CUDA provider is 230 MB). Undefined when the file is not such an ELF file.
 */
export function readElfDynamic(file: string): ElfDynamic | undefined {
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch {
    return undefined;
  }
  try {
    const size = statSync(file).size;
    const read = (offset: number, length: number): Buffer => {
      if (offset < 0 || length < 0 || offset + length > size) throw new RangeError('outside the file');
      const buf = Buffer.alloc(length);
      readSync(fd, buf, 0, length, offset);
      return buf;
    };
    const head = read(0, 64);
    if (head.readUInt32BE(0) !== 0x7f454c46 || head[4] !== 2 || head[5] !== 1) return undefined; // ELF, 64-bit, LE
    const phoff = Number(head.readBigUInt64LE(0x20));
    const phentsize = head.readUInt16LE(0x36);
    const phnum = head.readUInt16LE(0x38);
    const segments: { type: number; offset: number; vaddr: number; filesz: number }[] = [];
    const table = read(phoff, phentsize * phnum);
    for (let i = 0; i < phnum; i++) {
      const at = i * phentsize;
      segments.push({
        type: table.readUInt32LE(at),
        offset: Number(table.readBigUInt64LE(at + 8)),
        vaddr: Number(table.readBigUInt64LE(at + 16)),
        filesz: Number(table.readBigUInt64LE(at + 32)),
      });
    }
    const dynamic = segments.find((s) => s.type === 2); // PT_DYNAMIC
    if (!dynamic) return { needed: [], runpath: [] };
    const entries = read(dynamic.offset, dynamic.filesz);
    const needed: number[] = [];
    let strtab = -1;
    let strsz = 0;
    let runpath = -1;
    let rpath = -1;
    for (let at = 0; at + 16 <= entries.length; at += 16) {
      const tag = Number(entries.readBigInt64LE(at));
      const value = Number(entries.readBigUInt64LE(at + 8));
      if (tag === 0) break; // DT_NULL
      if (tag === 1) needed.push(value);
      else if (tag === 5) strtab = value;
      else if (tag === 10) strsz = value;
      else if (tag === 15) rpath = value;
      else if (tag === 29) runpath = value;
    }
    const load = segments.find((s) => s.type === 1 && strtab >= s.vaddr && strtab < s.vaddr + s.filesz);
    if (strtab < 0 || !load) return undefined;
    const strings = read(strtab - load.vaddr + load.offset, Math.min(strsz, size - (strtab - load.vaddr + load.offset)));
    const text = (offset: number) => {
      const end = strings.indexOf(0, offset);
      return strings.toString('utf8', offset, end < 0 ? strings.length : end);
    };
    const search = runpath >= 0 ? runpath : rpath;
    return { needed: needed.map(text), runpath: search >= 0 ? text(search).split(':').filter(Boolean) : [] };
  } catch {
    return undefined;
  } finally {
    closeSync(fd);
  }
}

/** ld.so.cache's library names → paths, from `ldconfig -p` (empty where there is no ldconfig). */
export function ldconfigLibraries(): Map<string, string> {
  const found = new Map<string, string>();
  const archTag = process.arch === 'x64' ? /x86-64/ : process.arch === 'arm64' ? /AArch64/i : /./;
  for (const ldconfig of ['/sbin/ldconfig', '/usr/sbin/ldconfig', 'ldconfig']) {
    let out: string;
    try {
      out = execFileSync(ldconfig, ['-p'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 5000 });
    } catch {
      continue;
    }
    for (const line of out.split('\n')) {
      const m = /^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S+)/.exec(line);
      if (m && archTag.test(m[2]) && !found.has(m[1])) found.set(m[1], m[3]);
    }
    break;
  }
  return found;
}

export interface CudaLibraryCheckOptions {
  /** Folder of onnxruntime_binding.node (default: the installed onnxruntime-node's). */
  binaryDir?: string;
  /** LD_LIBRARY_PATH comes from here (default process.env). */
  env?: NodeJS.ProcessEnv;
  /** ld.so.cache's name → path (default: `ldconfig -p`). */
  ldCache?: Map<string, string>;
  /** Other folders the loader searches (default STANDARD_LIBRARY_DIRS). */
  standardDirs?: string[];
}

export interface CudaLibraryReport {
  binaryDir: string;
  /** Provider libraries missing beside onnxruntime_binding.node. */
  missingProviders: string[];
  /** CUDA/cuDNN libraries the loader would not find. */
  missingLibraries: string[];
  /** Each library looked for → where it was found. */
  found: Record<string, string>;
}

/** Which of the libraries a CUDA session needs are missing (nothing is loaded). */
export function checkCudaLibraries(options: CudaLibraryCheckOptions = {}): CudaLibraryReport {
  const binaryDir = options.binaryDir ?? ortBinaryDir();
  const env = options.env ?? process.env;
  const missingProviders = PROVIDER_LIBRARIES.filter((name) => !existsSync(path.join(binaryDir, name)));
  const report: CudaLibraryReport = { binaryDir, missingProviders, missingLibraries: [], found: {} };
  const provider = path.join(binaryDir, 'libonnxruntime_providers_cuda.so');
  if (missingProviders.includes('libonnxruntime_providers_cuda.so')) return report;
  const elf = readElfDynamic(provider);
  const wanted = [
    ...(elf ? elf.needed.filter((n) => /^lib(cuda|cublas|curand|cufft|cudnn|nvrtc|nvJitLink)/i.test(n)) : CUDA_LIBRARIES_FALLBACK),
    ...RUNTIME_LOADED,
  ];
  const dirs = [
    ...(env.LD_LIBRARY_PATH ?? '').split(':').filter(Boolean),
    ...(elf?.runpath ?? []).map((d) => d.replace(/\$(ORIGIN|\{ORIGIN\})/g, binaryDir)),
    binaryDir,
  ];
  const ldCache = options.ldCache ?? ldconfigLibraries();
  const standard = options.standardDirs ?? STANDARD_LIBRARY_DIRS;
  for (const name of [...new Set(wanted)]) {
    const where =
      dirs.map((d) => path.join(d, name)).find((f) => existsSync(f)) ??
      ldCache.get(name) ??
      standard.map((d) => path.join(d, name)).find((f) => existsSync(f));
    if (where) report.found[name] = where;
    else report.missingLibraries.push(name);
  }
  return report;
}

/** The message for a report with something missing, or undefined when everything is there. */
export function describeMissing(report: CudaLibraryReport): string | undefined {
  if (report.missingProviders.length > 0) {
    return (
      `EXECUTION_PROVIDER=cuda, but onnxruntime-node's CUDA provider is not installed: ${report.missingProviders.join(', ')} ` +
      `missing in ${report.binaryDir} (this repository's .npmrc skips that download). Install it with: ${INSTALL_PROVIDER}. ` +
      'Or set EXECUTION_PROVIDER=cpu.'
    );
  }
  if (report.missingLibraries.length > 0) {
    return (
      `EXECUTION_PROVIDER=cuda, but the CUDA provider's libraries cannot be found: ${report.missingLibraries.join(', ')} ` +
      '(searched LD_LIBRARY_PATH, ld.so.cache and the standard library folders; onnxruntime-node 1.30 needs CUDA 13 and cuDNN 9). ' +
      `Install them with: ${INSTALL_CUDA}.`
    );
  }
  return undefined;
}

/** onnxruntime's errors when a CUDA session cannot start → what to do about them. */
const KNOWN_FAILURES: { pattern: RegExp; explain: (m: RegExpExecArray) => string }[] = [
  {
    pattern: /(lib[\w.+-]+\.so(?:\.\d+)*): cannot open shared object file/,
    explain: (m) => `the library ${m[1]} cannot be loaded. Install it with: ${/providers/.test(m[1]) ? INSTALL_PROVIDER : INSTALL_CUDA}`,
  },
  {
    pattern: /CUDA driver version is insufficient|cudaErrorInsufficientDriver/i,
    explain: () => 'the NVIDIA driver is older than the CUDA 13 runtime needs (CUDA 13 wants driver 580 or later; `nvidia-smi` shows the version): update the driver',
  },
  {
    pattern: /no CUDA-capable device|cudaErrorNoDevice/i,
    explain: () => 'no NVIDIA GPU is visible to this process (check `nvidia-smi`, CUDA_VISIBLE_DEVICES, and a container\'s --gpus option)',
  },
  {
    pattern: /invalid device ordinal|cudaErrorInvalidDevice/i,
    explain: () => 'the CUDA device id does not exist on this machine (see `nvidia-smi -L`; CUDA_VISIBLE_DEVICES renumbers them)',
  },
  {
    pattern: /no kernel image is available|cudaErrorNoKernelImageForDevice|unsupported.*(GPU|compute capability)/i,
    explain: () => 'this GPU is not supported by the CUDA provider build (its compute capability is too old for CUDA 13)',
  },
  {
    pattern: /out of memory|cudaErrorMemoryAllocation/i,
    explain: () => 'the GPU ran out of memory (use fewer engine threads per GPU, or a GPU with more memory)',
  },
  {
    pattern: /Failed to load shared library|Failed to load library/i,
    explain: () => `onnxruntime could not load its CUDA provider or a library it needs. Check: ${INSTALL_PROVIDER}; ${INSTALL_CUDA}`,
  },
];

/**
 * A one-paragraph explanation of onnxruntime's failure to create a CUDA session, or undefined when the
 * error is not about CUDA (a broken graph, say). `report` (from checkCudaLibraries) names what is missing.
 */
export function explainCudaFailure(message: string, report?: CudaLibraryReport): string | undefined {
  const fromReport = report && describeMissing(report);
  for (const { pattern, explain } of KNOWN_FAILURES) {
    const m = pattern.exec(message);
    if (m) return fromReport ?? `EXECUTION_PROVIDER=cuda, but the CUDA provider cannot start: ${explain(m)}. (onnxruntime: ${message.split('\n')[0]})`;
  }
  return undefined;
}
