// CLIP's byte-level BPE tokenizer (SD1.x / OpenAI CLIP), over a Hugging Face `vocab.json` + `merges.txt`.
// Same rules as openai/CLIP simple_tokenizer.py: clean the text (html-unescape, a light ftfy-like
// repair), collapse whitespace, lower-case, split with CLIP's regex, map UTF-8 bytes to GPT-2's
// printable characters, apply BPE merges with `</w>` on a word's last symbol.
import { readFile } from 'node:fs/promises';
import path from 'node:path';

export const CONTEXT_LENGTH = 77;
/** Content tokens that fit between BOS and EOS. */
export const MAX_CONTENT_TOKENS = CONTEXT_LENGTH - 2;

const BOS_TOKEN = '<|startoftext|>';
const EOS_TOKEN = '<|endoftext|>';
const END_OF_WORD = '</w>';
/** CLIP's merges.txt has a version line, then the 49152 - 256 - 2 merges it uses. */
const MERGE_COUNT = 49152 - 256 - 2;
const CACHE_LIMIT = 20_000;

// Python's str.isspace() set (what `\s` means in CLIP's Python regexes), spelled out because JS's
// `\s` differs (it has U+FEFF, lacks U+001C–U+001F and U+0085).
const WHITESPACE = '\\t\\n\\v\\f\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';
const WHITESPACE_RUN = new RegExp(`[${WHITESPACE}]+`, 'gu');
const PRE_TOKEN = new RegExp(
  `<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^${WHITESPACE}\\p{L}\\p{N}]+`,
  'giu',
);

export interface TokenizedPrompt {
  /** Content token ids of the whole text (no BOS/EOS, not truncated). */
  ids: number[];
  /** What the text encoder gets: BOS, at most 75 content ids, EOS, padding; always 77 long. */
  inputIds: number[];
  /** BPE token strings of `ids` (GPT-2 byte characters, `</w>` ends a word). */
  tokens: string[];
  /** True when some content tokens did not fit into the 75. */
  truncated: boolean;
  /** Number of content tokens (= ids.length). */
  tokenCount: number;
  /**
   * The space-separated words of the cleaned (lower-cased) prompt that lost some or all of their
   * tokens to truncation, in order.
   */
  droppedWords: string[];
}

/** GPT-2's reversible map from the 256 byte values to printable unicode characters. */
function byteToUnicodeTable(): string[] {
  const table: string[] = new Array(256);
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  let next = 0;
  for (let b = 0; b < 256; b++) {
    table[b] = String.fromCharCode(printable(b) ? b : 256 + next++);
  }
  return table;
}

const BYTE_TO_UNICODE = byteToUnicodeTable();
const UNICODE_TO_BYTE = new Map(BYTE_TO_UNICODE.map((ch, b) => [ch, b]));
const utf8 = new TextEncoder();
const utf8Decoder = new TextDecoder('utf-8', { fatal: false });

const NAMED_ENTITIES: Record<string, string> = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'", nbsp: '\u00a0' };

function unescapeHtml(text: string): string {
  return text.replace(/&(#[0-9]+|#[xX][0-9a-fA-F]+|[a-zA-Z]+);/g, (whole, body: string) => {
    if (body[0] === '#') {
      const code = body[1] === 'x' || body[1] === 'X' ? parseInt(body.slice(2), 16) : parseInt(body.slice(1), 10);
      return code > 0 && code <= 0x10ffff && !(code >= 0xd800 && code <= 0xdfff) ? String.fromCodePoint(code) : whole;
    }
    return NAMED_ENTITIES[body.toLowerCase()] ?? whole;
  });
}

const LIGATURES: Record<string, string> = {
  'ﬀ': 'ff', 'ﬁ': 'fi', 'ﬂ': 'fl', 'ﬃ': 'ffi', 'ﬄ': 'ffl', 'ﬅ': 'ſt', 'ﬆ': 'st',
  'Ĳ': 'IJ', 'ĳ': 'ij', 'Ǳ': 'DZ', 'ǲ': 'Dz', 'ǳ': 'dz', 'Ǆ': 'DŽ', 'ǅ': 'Dž', 'ǆ': 'dž',
  'Ǉ': 'LJ', 'ǈ': 'Lj', 'ǉ': 'lj', 'Ǌ': 'NJ', 'ǋ': 'Nj', 'ǌ': 'nj',
};

/**
 * The parts of ftfy.fix_text (which CLIP runs first) that matter for typed prompts: NFC, curly
 * quotes to straight ones, Latin ligatures, full-width characters to normal width, and no control
 * characters. (ftfy's mojibake repair is not reproduced.)
 */
function fixText(text: string): string {
  return text
    .replace(/\r\n?/g, '\n')
    .replace(/[\u0000-\u0008\u000b\u000e-\u001f\u007f\ufeff\ufff9-\ufffc]/g, '')
    .replace(/[\u02bc\u2018-\u201b]/g, "'")
    .replace(/[\u201c-\u201f]/g, '"')
    .replace(/[\ufb00-\ufb06\u0132\u0133\u01c4-\u01cc]/g, (ch) => LIGATURES[ch] ?? ch)
    .replace(/[\u3000\uff01-\uffee]/g, (ch) => ch.normalize('NFKC'))
    .normalize('NFC');
}

/** CLIP's text preparation: basic_clean (ftfy, html unescape twice, strip), whitespace_clean, lower(). */
export function cleanText(text: string): string {
  const cleaned = unescapeHtml(unescapeHtml(fixText(text)));
  return cleaned.replace(WHITESPACE_RUN, ' ').trim().toLowerCase();
}

/** Splits cleaned text into CLIP's pre-tokens (words, single digits, punctuation runs, contractions). */
export function preTokenize(cleaned: string): string[] {
  return cleaned.match(PRE_TOKEN) ?? [];
}

interface PreToken {
  text: string;
  /** Index of the space-separated word of the cleaned text that this pre-token is part of. */
  word: number;
}

function preTokensWithWords(cleaned: string): PreToken[] {
  const result: PreToken[] = [];
  let word = 0;
  let scanned = 0;
  for (const match of cleaned.matchAll(PRE_TOKEN)) {
    for (; scanned < match.index; scanned++) if (cleaned[scanned] === ' ') word++;
    result.push({ text: match[0], word });
  }
  return result;
}

function toByteCharacters(word: string): string {
  let out = '';
  for (const byte of utf8.encode(word)) out += BYTE_TO_UNICODE[byte];
  return out;
}

/** Turns BPE token strings back into text (inverse of the byte map; `</w>` becomes a space). */
export function decodeTokens(tokens: readonly string[]): string {
  const bytes: number[] = [];
  const text = tokens.join('').replaceAll(END_OF_WORD, ' ');
  for (const ch of text) {
    const byte = UNICODE_TO_BYTE.get(ch);
    if (byte !== undefined) bytes.push(byte);
    else bytes.push(...utf8.encode(ch));
  }
  return utf8Decoder.decode(new Uint8Array(bytes)).trim();
}

export class ClipTokenizer {
  readonly bosId: number;
  readonly eosId: number;
  readonly padId: number;
  private readonly vocab: Map<string, number>;
  private readonly mergeRanks: Map<string, number>;
  private readonly cache = new Map<string, string[]>();

  /**
   * @param vocab token → id (vocab.json)
   * @param merges the lines of merges.txt after its `#version` line, "first second" each
   * @param padToken the padding token (SD1.x: `<|endoftext|>`; some SD2 tokenizers use `!`)
   */
  constructor(vocab: Record<string, number>, merges: readonly string[], padToken: string = EOS_TOKEN) {
    this.vocab = new Map(Object.entries(vocab));
    this.bosId = this.requireId(BOS_TOKEN);
    this.eosId = this.requireId(EOS_TOKEN);
    this.padId = this.requireId(padToken);
    this.mergeRanks = new Map();
    merges.slice(0, MERGE_COUNT).forEach((line, rank) => {
      const parts = line.split(' ');
      if (parts.length !== 2) throw new Error(`merges.txt line ${rank + 2} is not "first second": ${JSON.stringify(line)}`);
      this.mergeRanks.set(line, rank);
    });
  }

  /**
   * Reads `vocab.json` and `merges.txt` from a Hugging Face tokenizer folder. The pad token comes from
   * `special_tokens_map.json` or `tokenizer_config.json` when present, else it is `<|endoftext|>`.
   */
  static async load(dir: string): Promise<ClipTokenizer> {
    const vocabFile = path.join(dir, 'vocab.json');
    const mergesFile = path.join(dir, 'merges.txt');
    const vocabText = await readRequired(vocabFile, 'vocabulary');
    const mergesText = await readRequired(mergesFile, 'merge list');
    let vocab: Record<string, number>;
    try {
      vocab = JSON.parse(vocabText) as Record<string, number>;
    } catch (err) {
      throw new Error(`${vocabFile} is not valid JSON: ${(err as Error).message}`);
    }
    if (typeof vocab !== 'object' || vocab === null || Array.isArray(vocab)) {
      throw new Error(`${vocabFile} must map tokens to ids`);
    }
    const lines = mergesText.replace(/\r\n/g, '\n').trim().split('\n');
    const merges = lines[0]?.startsWith('#version') ? lines.slice(1) : lines;
    const padToken = (await readPadToken(dir)) ?? EOS_TOKEN;
    return new ClipTokenizer(vocab, merges, padToken);
  }

  /** Content token ids of `text` (no BOS/EOS, no truncation). */
  encode(text: string): number[] {
    return preTokenize(cleanText(text)).flatMap((piece) => this.bpe(piece)).map((token) => this.idOf(token));
  }

  tokenize(text: string): TokenizedPrompt {
    const cleaned = cleanText(text);
    const tokens: string[] = [];
    const droppedWordIndices = new Set<number>();
    for (const piece of preTokensWithWords(cleaned)) {
      for (const token of this.bpe(piece.text)) {
        tokens.push(token);
        if (tokens.length > MAX_CONTENT_TOKENS) droppedWordIndices.add(piece.word);
      }
    }
    const ids = tokens.map((token) => this.idOf(token));
    const inputIds = [this.bosId, ...ids.slice(0, MAX_CONTENT_TOKENS), this.eosId];
    while (inputIds.length < CONTEXT_LENGTH) inputIds.push(this.padId);
    const words = cleaned.split(' ');
    const droppedWords = [...droppedWordIndices].map((i) => words[i]);
    return {
      ids,
      inputIds,
      tokens,
      truncated: ids.length > MAX_CONTENT_TOKENS,
      tokenCount: ids.length,
      droppedWords,
    };
  }

  private bpe(word: string): string[] {
    const cached = this.cache.get(word);
    if (cached) return cached;
    const result = word === BOS_TOKEN || word === EOS_TOKEN ? [word] : this.merge(toByteCharacters(word));
    if (this.cache.size >= CACHE_LIMIT) this.cache.clear();
    this.cache.set(word, result);
    return result;
  }

  /** Applies the lowest-ranked merge present until none applies. */
  private merge(chars: string): string[] {
    let symbols = Array.from(chars);
    symbols[symbols.length - 1] += END_OF_WORD;
    while (symbols.length > 1) {
      let bestRank = Infinity;
      let bestPair = '';
      for (let i = 0; i < symbols.length - 1; i++) {
        const pair = `${symbols[i]} ${symbols[i + 1]}`;
        const rank = this.mergeRanks.get(pair);
        if (rank !== undefined && rank < bestRank) {
          bestRank = rank;
          bestPair = pair;
        }
      }
      if (bestRank === Infinity) break;
      const [first, second] = bestPair.split(' ');
      const merged: string[] = [];
      for (let i = 0; i < symbols.length; i++) {
        if (i < symbols.length - 1 && symbols[i] === first && symbols[i + 1] === second) {
          merged.push(first + second);
          i++;
        } else {
          merged.push(symbols[i]);
        }
      }
      symbols = merged;
    }
    return symbols;
  }

  private idOf(token: string): number {
    return this.vocab.get(token) ?? this.eosId;
  }

  private requireId(token: string): number {
    const id = this.vocab.get(token);
    if (id === undefined) throw new Error(`the vocabulary has no ${token} token`);
    return id;
  }
}

async function readRequired(file: string, what: string): Promise<string> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new Error(`the tokenizer ${what} ${file} does not exist`);
    throw new Error(`cannot read the tokenizer ${what} ${file}: ${(err as Error).message}`);
  }
}

async function readPadToken(dir: string): Promise<string | undefined> {
  for (const name of ['special_tokens_map.json', 'tokenizer_config.json']) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(await readFile(path.join(dir, name), 'utf8'));
    } catch {
      continue;
    }
    const pad = (parsed as { pad_token?: unknown })?.pad_token;
    if (typeof pad === 'string') return pad;
    if (pad && typeof pad === 'object' && typeof (pad as { content?: unknown }).content === 'string') {
      return (pad as { content: string }).content;
    }
  }
  return undefined;
}
