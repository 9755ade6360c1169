// Rendering of engine outputs: PNGs with A1111 parameters, contribution panels, grids.
export { encodePng, readPngText, insertPngText, displaySize, crc32, type EncodePngOptions, type Resample } from './png.ts';
export { formatParameters, parseParameters, type ParsedParameters } from './parameters.ts';
export { renderContributionPanel, type PanelOptions } from './panel.ts';
export { renderGrid, type GridOptions, type GridTile } from './grid.ts';
export { rgbFromFloat } from './rgb.ts';
export { loadRgbImage } from './load.ts';
export type { ColormapName } from './colormap.ts';
