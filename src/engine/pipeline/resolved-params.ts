// The parameters a generation actually used, echoed in its result (and from there into the PNG).
import type { ResolvedParams } from '../api.ts';
import type { ResolvedRequest } from '../resolve.ts';

export function echoParams(req: ResolvedRequest, model: string, truncatedWords: string[]): ResolvedParams {
  const params: ResolvedParams = {
    prompt: req.prompt,
    negative: req.negative,
    mode: req.mode,
    ensemble: req.ensemble?.id,
    experts: req.experts.map((e) => e.id),
    // Weights mean something only where the experts' outputs or parameters are mixed by them.
    weights: req.mode === 'average' || req.mode === 'merge' ? req.weights : undefined,
    seed: req.seed,
    steps: req.steps,
    guidance: req.guidance,
    scheduler: req.scheduler,
    karras: req.karras,
    width: req.width,
    height: req.height,
    count: req.count,
    model,
    truncatedWords,
  };
  if (req.img2img) params.strength = req.img2img.strength;
  return params;
}
