// /imagine image:<attachment>: the picture image-to-image starts from. Checked from what Discord says of
// the attachment before anything is downloaded (type, size, dimensions), downloaded with a timeout and
// a byte cap, decoded (sharp: first frame, a pixel limit checked from the header), fitted to the
// request's size and kept as PNG with the job (Discord's attachment URLs expire).
import { encodePng, loadRgbImage } from '../engine/render/index.ts';

export const INIT_IMAGE_LIMITS = {
  /** Bytes, before Discord's own limit for the interaction (attachment_size_limit), whichever is lower. */
  maxBytes: 10 * 1024 * 1024,
  /** Width and height, when Discord gives them. */
  maxSide: 4096,
  /** Decoded pixels (sharp's limitInputPixels). */
  maxPixels: 4096 * 4096,
  downloadTimeoutMs: 15_000,
  minStrength: 0.05,
  maxStrength: 1,
} as const;

export const INIT_IMAGE_TYPES = ['image/png', 'image/jpeg', 'image/webp'] as const;

export const NO_ENCODER_MESSAGE = 'This model package cannot draw from an image (it has no VAE encoder).';

/** What Discord says of an attachment (discord.js Attachment has these). */
export interface AttachmentInfo {
  name: string;
  url: string;
  size: number;
  contentType: string | null;
  width: number | null;
  height: number | null;
}

function mib(bytes: number): string {
  return `${(bytes / 1024 / 1024).toFixed(bytes < 1024 * 1024 ? 2 : 1)} MiB`;
}

/** Why this attachment is refused, from Discord's data alone (nothing is downloaded), if it is. */
export function attachmentProblem(attachment: AttachmentInfo, interactionLimit?: number | null): string | undefined {
  const type = (attachment.contentType ?? '').split(';')[0].trim().toLowerCase();
  if (!(INIT_IMAGE_TYPES as readonly string[]).includes(type)) {
    return `The attachment must be a PNG, JPEG or WebP picture (got ${type === '' ? 'a file of unknown type' : type}).`;
  }
  const limit = Math.min(INIT_IMAGE_LIMITS.maxBytes, interactionLimit ?? Infinity);
  if (attachment.size > limit) return `The picture is too big (${mib(attachment.size)}; at most ${mib(limit)}).`;
  const { maxSide } = INIT_IMAGE_LIMITS;
  if ((attachment.width ?? 0) > maxSide || (attachment.height ?? 0) > maxSide) {
    return `The picture is too large (${attachment.width}×${attachment.height} pixels; at most ${maxSide}×${maxSide}).`;
  }
  return undefined;
}

export type Fetched = { ok: true; bytes: Uint8Array } | { ok: false; message: string; tooBig?: true };

/** Downloads at most `maxBytes` (a longer body is cut off and refused), within a timeout. */
export async function downloadAttachment(
  url: string,
  maxBytes: number,
  timeoutMs: number = INIT_IMAGE_LIMITS.downloadTimeoutMs,
): Promise<Fetched> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(new Error('timeout')), timeoutMs);
  try {
    const response = await fetch(url, { signal: controller.signal, redirect: 'follow' });
    if (!response.ok || !response.body) return { ok: false, message: `I could not download the picture (HTTP ${response.status}).` };
    const declared = Number(response.headers.get('content-length') ?? NaN);
    if (Number.isFinite(declared) && declared > maxBytes) {
      controller.abort();
      return { ok: false, message: `The picture is too big (more than ${mib(maxBytes)}).`, tooBig: true };
    }
    const chunks: Uint8Array[] = [];
    let total = 0;
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      total += value.byteLength;
      if (total > maxBytes) {
        controller.abort();
        return { ok: false, message: `The picture is too big (more than ${mib(maxBytes)}).`, tooBig: true };
      }
      chunks.push(value);
    }
    return { ok: true, bytes: Buffer.concat(chunks) };
  } catch {
    return {
      ok: false,
      message: controller.signal.aborted ? 'Downloading the picture took too long; try again.' : 'I could not download the picture.',
    };
  } finally {
    clearTimeout(timer);
  }
}

/** PNG, JPEG or WebP by their first bytes (the content type Discord reports comes from the file name). */
export function sniffImageType(bytes: Uint8Array): 'png' | 'jpeg' | 'webp' | undefined {
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, Math.min(bytes.byteLength, 16));
  if (b.length >= 8 && b.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]))) return 'png';
  if (b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return 'jpeg';
  if (b.length >= 12 && b.toString('latin1', 0, 4) === 'RIFF' && b.toString('latin1', 8, 12) === 'WEBP') return 'webp';
  return undefined;
}

export type Fitted = { ok: true; png: Buffer } | { ok: false; message: string };

/** Decodes (first frame), checks the pixel count, scales to cover and centre-crops to width × height; PNG. */
export async function fitInitImage(bytes: Uint8Array, width: number, height: number): Promise<Fitted> {
  if (!sniffImageType(bytes)) return { ok: false, message: 'The attachment is not a PNG, JPEG or WebP picture.' };
  try {
    const image = await loadRgbImage(bytes, width, height, { maxPixels: INIT_IMAGE_LIMITS.maxPixels });
    return { ok: true, png: await encodePng(image) };
  } catch (error) {
    const text = error instanceof Error ? error.message : String(error);
    if (/pixel limit/i.test(text)) {
      const side = INIT_IMAGE_LIMITS.maxSide;
      return { ok: false, message: `The picture has too many pixels (at most about ${side}×${side}).` };
    }
    return { ok: false, message: 'I could not read that picture (it is damaged or not an image).' };
  }
}

/** The whole way from an attachment to the fitted PNG, or why not. */
export async function initImageFromAttachment(
  attachment: AttachmentInfo,
  size: { width: number; height: number },
  interactionLimit?: number | null,
): Promise<Fitted> {
  const problem = attachmentProblem(attachment, interactionLimit);
  if (problem) return { ok: false, message: problem };
  // No more than Discord announced: a longer body is cut off and refused.
  const limit = Math.min(INIT_IMAGE_LIMITS.maxBytes, interactionLimit ?? Infinity);
  const announced = attachment.size > 0 ? attachment.size : Infinity;
  const fetched = await downloadAttachment(attachment.url, Math.min(limit, announced));
  if (!fetched.ok) {
    if (fetched.tooBig && announced < limit) return { ok: false, message: 'The download was longer than Discord announced for this file; I did not use it.' };
    return { ok: false, message: fetched.message };
  }
  return fitInitImage(fetched.bytes, size.width, size.height);
}
