// What people read for each mode and scheduler: the bot's pickers and result messages, the CLI's and
// the evaluation's captions, and the `parameters` text of a PNG. The scheduler labels are
// AUTOMATIC1111's sampler names, so webui users and PNG readers recognise them; changing one changes
// what those readers understand.
import type { Mode, SchedulerName } from './api.ts';

export interface ModeLabel {
  /** Short name: comparison captions and evaluation rows ("Average of 3"). */
  name: string;
  /** The mode of a finished picture, as its result shows it. */
  title: string;
  /** What the mode does, in a few words (the /imagine mode picker). */
  summary?: string;
}

export const MODE_LABELS: Readonly<Record<Mode, ModeLabel>> = {
  afa: { name: 'AFA', title: 'AFA ensemble', summary: 'trained ensemble (adaptive feature aggregation)' },
  fuse: { name: 'Fuse', title: 'Fuse ensemble', summary: 'training-free ensemble (per-pixel feature fusion)' },
  average: { name: 'Average', title: 'Average', summary: 'mean of the models’ predictions' },
  merge: { name: 'Merge', title: 'Weight merge', summary: 'average of the models’ weights' },
  single: { name: 'Single model', title: 'Single model' },
};

/** A mode as a picker offers it: "AFA — trained ensemble (adaptive feature aggregation)". */
export function modeChoice(mode: Mode): string {
  const { name, summary } = MODE_LABELS[mode];
  return summary ? `${name} — ${summary}` : name;
}

/** AUTOMATIC1111's sampler names for our schedulers. */
export const SCHEDULER_LABELS: Readonly<Record<SchedulerName, string>> = {
  ddim: 'DDIM',
  euler: 'Euler',
  euler_a: 'Euler a',
  dpmpp_2m: 'DPM++ 2M',
};

/** The Karras sigma schedule, as A1111 names it (its "Schedule type", once a sampler-name suffix). */
export const KARRAS_LABEL = 'Karras';

/** "DPM++ 2M", "DPM++ 2M Karras"; a name we do not know is shown as it is. */
export function schedulerLabel(scheduler: SchedulerName, karras = false): string {
  const name = SCHEDULER_LABELS[scheduler] ?? scheduler;
  return karras ? `${name} ${KARRAS_LABEL}` : name;
}
