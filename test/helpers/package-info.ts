// A PackageInfo of four shape experts (the demo's three and "waves") for tests of the bot's model
// choice and request building, which read nothing else of a package.
import type { EnsembleInfo, ExpertInfo, PackageInfo } from '../../src/engine/api.ts';

/** The demo's three experts, as PackageInfo lists them. */
export const SHAPE_EXPERTS: ExpertInfo[] = [
  { id: 'curves', title: 'Curves', description: 'circles and rings' },
  { id: 'blocks', title: 'Blocks', description: 'squares and bars' },
  { id: 'spikes', title: 'Spikes', description: 'stars and triangles' },
];

export function shapesInfo(ensembles: EnsembleInfo[]): PackageInfo {
  return {
    name: 'demo',
    version: '1.0.0',
    description: 'shapes',
    experts: [...SHAPE_EXPERTS, { id: 'waves', title: 'Waves', description: 'stripes' }],
    ensembles,
    defaults: { steps: 20, guidance: 5, scheduler: 'ddim', width: 64, height: 64 },
    size: { min: 32, max: 128, multiple: 4 },
    executionProvider: 'cpu',
  };
}

export const TRIO: EnsembleInfo = { id: 'trio', title: 'Trio (AFA)', description: 'three experts', method: 'afa', experts: ['curves', 'blocks', 'spikes'], subsets: true };
