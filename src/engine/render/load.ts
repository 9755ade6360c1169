// Pictures from files (PNG, JPEG, WebP, …) as RgbImage, for image-to-image.
import sharp from 'sharp';
import type { RgbImage } from '../api.ts';

/**
 * Decodes a picture (a file path or its bytes) and fits it to `width` × `height`: scaled to cover the
 * size and cropped around the centre (no distortion), transparency flattened onto white, sRGB, 8-bit
 * RGB. The engine takes init images only at the request's exact size; this is how callers get there.
 */
export async function loadRgbImage(
  source: string | Uint8Array,
  width: number,
  height: number,
  options: {
    /** Refuse pictures with more pixels (sharp's limitInputPixels, checked from the header before decoding). */
    maxPixels?: number;
  } = {},
): Promise<RgbImage> {
  // Animated pictures: the first frame only (sharp's default, pages: 1).
  const { data, info } = await sharp(source, options.maxPixels !== undefined ? { limitInputPixels: options.maxPixels } : {})
    .rotate() // EXIF orientation
    .flatten({ background: '#ffffff' })
    .toColourspace('srgb')
    .resize(width, height, { fit: 'cover', position: 'centre', kernel: 'lanczos3' })
    .removeAlpha()
    .raw()
    .toBuffer({ resolveWithObject: true });
  if (info.width !== width || info.height !== height || info.channels !== 3) {
    throw new Error(`decoded ${info.width}×${info.height}×${info.channels}, expected ${width}×${height}×3`);
  }
  return { width, height, data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}
