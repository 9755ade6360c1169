// The /imagine `model` option: an ensemble id (AFA), an expert id (single model) or `a+b[+c]`
// (a combination of experts), and its autocomplete answered from the package info in memory.
import type { EnsembleInfo, Mode, PackageInfo } from '../engine/api.ts';

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

/** An AFA ensemble that can run exactly these experts (the whole ensemble, or a subset when it supports subsets). */
function ensembleFor(info: PackageInfo, experts: string[]): EnsembleInfo | undefined {
  return (
    info.ensembles.find((e) => sameSet(e.experts, experts)) ??
    info.ensembles.find((e) => e.subsets && experts.every((id) => e.experts.includes(id)))
  );
}

function expertList(info: PackageInfo): string {
  return info.experts.map((e) => e.id).join(', ');
}

export function resolveModelChoice(value: string | null | undefined, mode: Mode | null | undefined, info: PackageInfo): ModelChoiceResult {
  const typed = (value ?? '').trim();
  if (typed === '') return defaultChoice(mode, info);

  if (typed.includes('+')) return combinationChoice(typed, mode, info);

  const ensemble = findId(info.ensembles, typed);
  if (ensemble) {
    switch (mode ?? 'afa') {
      case 'afa':
        return { ok: true, selection: { mode: 'afa', ensemble: ensemble.id, expertIds: [...ensemble.experts] } };
      case 'average':
      case 'merge':
        return { ok: true, selection: { mode: mode!, experts: [...ensemble.experts], expertIds: [...ensemble.experts] } };
      case 'single':
        return { ok: false, message: `Mode single needs one expert, not the ensemble ${ensemble.id}. Experts: ${expertList(info)}.` };
    }
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
  const wanted = mode ?? (firstEnsemble ? 'afa' : 'single');
  if (wanted === 'afa') {
    if (!firstEnsemble) return { ok: false, message: 'This model package has no trained AFA ensemble; use mode average, merge or single.' };
    return { ok: true, selection: { mode: 'afa', ensemble: firstEnsemble.id, expertIds: [...firstEnsemble.experts] } };
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
  const ensemble = ensembleFor(info, experts);
  const wanted = mode ?? (ensemble ? 'afa' : 'average');
  switch (wanted) {
    case 'single':
      return { ok: false, message: `Mode single takes one expert, not ${experts.length}; drop the + or choose average, merge or afa.` };
    case 'afa':
      if (!ensemble) {
        return {
          ok: false,
          message: `No trained AFA ensemble combines ${experts.join('+')}; use mode average or merge, or an ensemble from /models.`,
        };
      }
      return {
        ok: true,
        selection: {
          mode: 'afa',
          ensemble: ensemble.id,
          ...(sameSet(ensemble.experts, experts) ? {} : { experts }),
          expertIds: experts,
        },
      };
    case 'average':
    case 'merge':
      return { ok: true, selection: { mode: wanted, experts, expertIds: experts } };
  }
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
      add(`${ensemble.title} — AFA ensemble of ${ensemble.experts.map(title).join(', ')}`, ensemble.id);
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
  return ensemble ? `${titles} — AFA (${ensemble.id})` : `${titles} — average`;
}
