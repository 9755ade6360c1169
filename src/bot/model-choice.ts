// The /imagine `model` option: an ensemble id (AFA or fuse, by its method), an expert id (single model) or `a+b[+c]`
// (a combination of experts), and its autocomplete answered from the package info in memory.
import { isEnsembleMode, type EnsembleInfo, type EnsembleMethod, type Mode, type PackageInfo } from '../engine/api.ts';
import { MODE_LABELS } from '../engine/labels.ts';

export interface ModelSelection {
  mode: Mode;
  ensemble?: string;
  experts?: string[];
  /** The experts involved, in order (for labels and Compare). */
  expertIds: string[];
}

export type ModelChoiceResult = { ok: true; selection: ModelSelection } | { ok: false; message: string };

const MAX_CHOICES = 25;
const MAX_CHOICE_NAME = 100;

function findId<T extends { id: string }>(items: T[], id: string): T | undefined {
  return items.find((item) => item.id === id) ?? items.find((item) => item.id.toLowerCase() === id.toLowerCase());
}

function sameSet(a: string[], b: string[]): boolean {
  return a.length === b.length && a.every((id) => b.includes(id));
}

/**
 * An ensemble of `method` (any method when absent; AFA before fuse) that can run exactly these
 * experts: the whole ensemble, or a subset when it supports subsets.
 */
function ensembleFor(info: PackageInfo, experts: string[], method?: EnsembleMethod): EnsembleInfo | undefined {
  if (method === undefined) return ensembleFor(info, experts, 'afa') ?? ensembleFor(info, experts, 'fuse');
  const ofMethod = info.ensembles.filter((e) => e.method === method);
  return (
    ofMethod.find((e) => sameSet(e.experts, experts)) ??
    ofMethod.find((e) => e.subsets && experts.every((id) => e.experts.includes(id)))
  );
}

function expertList(info: PackageInfo): string {
  return info.experts.map((e) => e.id).join(', ');
}

/** "fuse, average or merge": the other ways to combine experts (the other ensemble mode when the package has one). */
function otherModes(info: PackageInfo, method: EnsembleMethod): string {
  const modes = [...new Set(info.ensembles.filter((e) => e.method !== method).map((e) => e.method)), 'average', 'merge'];
  return `${modes.slice(0, -1).join(', ')} or ${modes[modes.length - 1]}`;
}

/** Why mode afa or fuse cannot run: the package has no ensemble of that kind. */
function noEnsembleMessage(info: PackageInfo, method: EnsembleMethod): string {
  return method === 'afa'
    ? `This model package has no trained AFA ensemble; use mode ${otherModes(info, method)}, or single.`
    : `This model package has no fuse ensemble (training-free feature fusion); use mode ${otherModes(info, method)}. ` +
        'Whoever runs the bot can add one with `python3 -m trainer.export --add-to <package> --method fuse --experts a,b,c`.';
}

function ensembleSelection(ensemble: EnsembleInfo, experts: string[] = ensemble.experts): ModelChoiceResult {
  return {
    ok: true,
    selection: {
      mode: ensemble.method,
      ensemble: ensemble.id,
      ...(sameSet(ensemble.experts, experts) ? {} : { experts: [...experts] }),
      expertIds: [...experts],
    },
  };
}

export function resolveModelChoice(value: string | null | undefined, mode: Mode | null | undefined, info: PackageInfo): ModelChoiceResult {
  const typed = (value ?? '').trim();
  if (typed === '') return defaultChoice(mode, info);

  if (typed.includes('+')) return combinationChoice(typed, mode, info);

  const ensemble = findId(info.ensembles, typed);
  if (ensemble) {
    const wanted = mode ?? ensemble.method;
    if (isEnsembleMode(wanted)) {
      if (ensemble.method === wanted) return ensembleSelection(ensemble);
      // The other kind of ensemble over the same experts (e.g. model trio, mode fuse).
      const sibling = ensembleFor(info, ensemble.experts, wanted);
      if (sibling) return ensembleSelection(sibling, ensemble.experts);
      if (!info.ensembles.some((e) => e.method === wanted)) return { ok: false, message: noEnsembleMessage(info, wanted) };
      return {
        ok: false,
        message: `${ensemble.id} is ${ensemble.method === 'afa' ? 'a trained AFA' : 'a fuse'} ensemble and no ${MODE_LABELS[wanted].name} ensemble combines its experts (${ensemble.experts.join('+')}); choose mode ${otherModes(info, wanted)}.`,
      };
    }
    if (wanted === 'single') {
      return { ok: false, message: `Mode single needs one expert, not the ensemble ${ensemble.id}. Experts: ${expertList(info)}.` };
    }
    return { ok: true, selection: { mode: wanted, experts: [...ensemble.experts], expertIds: [...ensemble.experts] } };
  }

  const expert = findId(info.experts, typed);
  if (expert) {
    if ((mode ?? 'single') === 'single') {
      return { ok: true, selection: { mode: 'single', experts: [expert.id], expertIds: [expert.id] } };
    }
    const partner = info.experts.find((e) => e.id !== expert.id)?.id ?? 'another';
    return {
      ok: false,
      message: `Mode ${mode} needs two or more models; try \`${expert.id}+${partner}\` or an ensemble.`,
    };
  }
  return { ok: false, message: `Unknown model "${typed}". See /models, or pick one from the list while typing.` };
}

function defaultChoice(mode: Mode | null | undefined, info: PackageInfo): ModelChoiceResult {
  const firstEnsemble = info.ensembles[0];
  const firstExpert = info.experts[0];
  const wanted = mode ?? firstEnsemble?.method ?? 'single';
  if (isEnsembleMode(wanted)) {
    const ensemble = info.ensembles.find((e) => e.method === wanted);
    if (!ensemble) return { ok: false, message: noEnsembleMessage(info, wanted) };
    return ensembleSelection(ensemble);
  }
  if (wanted === 'single') {
    if (!firstExpert) return { ok: false, message: 'This model package has no experts.' };
    return { ok: true, selection: { mode: 'single', experts: [firstExpert.id], expertIds: [firstExpert.id] } };
  }
  const experts = firstEnsemble ? [...firstEnsemble.experts] : info.experts.map((e) => e.id);
  if (experts.length < 2) return { ok: false, message: `Mode ${wanted} needs two or more experts; this package has ${experts.length}.` };
  return { ok: true, selection: { mode: wanted, experts, expertIds: experts } };
}

function combinationChoice(typed: string, mode: Mode | null | undefined, info: PackageInfo): ModelChoiceResult {
  const parts = typed.split('+').map((part) => part.trim());
  if (parts.some((part) => part === '')) {
    return { ok: false, message: `"${typed}" is not a combination; write expert ids joined by +, e.g. \`${info.experts.slice(0, 2).map((e) => e.id).join('+')}\`.` };
  }
  const experts: string[] = [];
  for (const part of parts) {
    const expert = findId(info.experts, part);
    if (!expert) return { ok: false, message: `Unknown expert "${part}". Experts: ${expertList(info)}.` };
    if (experts.includes(expert.id)) return { ok: false, message: `${expert.id} appears twice in "${typed}".` };
    experts.push(expert.id);
  }
  const wanted = mode ?? ensembleFor(info, experts)?.method ?? 'average';
  if (isEnsembleMode(wanted)) {
    const ensemble = ensembleFor(info, experts, wanted);
    if (!ensemble) {
      if (!info.ensembles.some((e) => e.method === wanted)) return { ok: false, message: noEnsembleMessage(info, wanted) };
      return {
        ok: false,
        message:
          wanted === 'afa'
            ? `No trained AFA ensemble combines ${experts.join('+')}; use mode ${otherModes(info, wanted)}, or an ensemble from /models.`
            : `No fuse ensemble combines ${experts.join('+')}; use mode ${otherModes(info, wanted)}, or an ensemble from /models.`,
      };
    }
    return ensembleSelection(ensemble, experts);
  }
  if (wanted === 'single') {
    return { ok: false, message: `Mode single takes one expert, not ${experts.length}; drop the + or choose average, merge, fuse or afa.` };
  }
  return { ok: true, selection: { mode: wanted, experts, expertIds: experts } };
}

function truncateName(name: string): string {
  return name.length <= MAX_CHOICE_NAME ? name : `${name.slice(0, MAX_CHOICE_NAME - 1)}…`;
}

/** Autocomplete choices for what the user has typed so far (at most 25, from memory). */
export function modelSuggestions(typedRaw: string, info: PackageInfo): { name: string; value: string }[] {
  const typed = typedRaw.trim().toLowerCase();
  const title = (id: string): string => info.experts.find((e) => e.id === id)?.title ?? id;
  const choices: { name: string; value: string }[] = [];
  const add = (name: string, value: string): void => {
    if (choices.length < MAX_CHOICES && !choices.some((c) => c.value === value)) {
      choices.push({ name: truncateName(name), value });
    }
  };

  if (typed.includes('+')) {
    const parts = typed.split('+').map((p) => p.trim());
    const partial = parts.pop() ?? '';
    const done = parts.map((p) => findId(info.experts, p)?.id);
    if (done.every((id): id is string => id !== undefined)) {
      const exact = findId(info.experts, partial);
      if (exact && !done.includes(exact.id)) add(describeCombination([...done, exact.id], info), [...done, exact.id].join('+'));
      for (const expert of info.experts) {
        if (done.includes(expert.id)) continue;
        if (partial !== '' && !expert.id.toLowerCase().includes(partial) && !expert.title.toLowerCase().includes(partial)) continue;
        add(describeCombination([...done, expert.id], info), [...done, expert.id].join('+'));
      }
    }
    return choices;
  }

  const matches = (...texts: string[]): boolean => typed === '' || texts.some((t) => t.toLowerCase().includes(typed));
  for (const ensemble of info.ensembles) {
    if (matches(ensemble.id, ensemble.title, ...ensemble.experts)) {
      add(`${ensemble.title} — ${MODE_LABELS[ensemble.method].name} ensemble of ${ensemble.experts.map(title).join(', ')}`, ensemble.id);
    }
  }
  for (const expert of info.experts) {
    if (matches(expert.id, expert.title, expert.description)) add(`${expert.title} — ${expert.description}`, expert.id);
  }
  for (let i = 0; i < info.experts.length; i++) {
    for (let j = i + 1; j < info.experts.length; j++) {
      const pair = [info.experts[i].id, info.experts[j].id];
      if (matches(...pair, title(pair[0]), title(pair[1]))) add(describeCombination(pair, info), pair.join('+'));
    }
  }
  return choices;
}

function describeCombination(experts: string[], info: PackageInfo): string {
  const titles = experts.map((id) => info.experts.find((e) => e.id === id)?.title ?? id).join(' + ');
  const ensemble = ensembleFor(info, experts);
  return ensemble ? `${titles} — ${MODE_LABELS[ensemble.method].name} (${ensemble.id})` : `${titles} — average`;
}
