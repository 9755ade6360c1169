// What the bot's messages say and look like: queue position, progress, results, failures.
import { ActionRowBuilder, ButtonBuilder, ButtonStyle, EmbedBuilder, type APIActionRowComponent, type APIButtonComponentWithCustomId, type APIEmbed } from 'discord.js';
import { isEnsembleMode, type GenerateRequest, type PackageInfo, type ResolvedParams } from '../engine/api.ts';
import { MODE_LABELS, schedulerLabel } from '../engine/labels.ts';
import type { JobKind, JobRecord } from '../store/job-store.ts';
import { buttonId } from './custom-ids.ts';
import { describeSize } from './image-size.ts';

export interface OutgoingFile {
  name: string;
  data: Buffer;
}

/** A message body independent of where it goes (interaction response or channel message). */
export interface OutgoingMessage {
  content: string;
  embeds?: APIEmbed[];
  components?: APIActionRowComponent<APIButtonComponentWithCustomId>[];
  files?: OutgoingFile[];
  /** Users that may be pinged by the content. */
  mentionUserIds?: string[];
}

const KIND_VERBS: Record<JobKind, string> = {
  imagine: 'Drawing',
  reroll: 'Rerolling',
  panel: 'Mapping contributions',
  compare: 'Comparing',
  vary: 'Varying',
  upscale: 'Upscaling',
};

export function clip(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, max - 1)}…`;
}

/** Keeps user text from pinging or formatting: mentions are broken up and markdown is escaped. */
export function quoteUserText(text: string, max = 300): string {
  const escaped = clip(text, max)
    .replace(/[\\*_`~|>#[\]()-]/g, (c) => `\\${c}`)
    .replace(/@/g, '@\u200b')
    .replace(/\n/g, ' ');
  return escaped;
}

export function expertTitle(info: PackageInfo, id: string): string {
  return info.experts.find((e) => e.id === id)?.title ?? id;
}

/** "Duo (AFA): Curves + Blocks", "Curves", "Curves + Spikes (average)". */
export function describeModels(request: Pick<GenerateRequest, 'mode' | 'ensemble' | 'experts'>, info: PackageInfo): string {
  const ensemble = request.ensemble ? info.ensembles.find((e) => e.id === request.ensemble) : undefined;
  const experts = request.experts ?? ensemble?.experts ?? [];
  const titles = experts.map((id) => expertTitle(info, id)).join(' + ');
  if (isEnsembleMode(request.mode)) return `${ensemble?.title ?? request.ensemble ?? MODE_LABELS[request.mode].name}: ${titles}`;
  if (request.mode === 'single') return titles;
  return `${titles} (${request.mode})`;
}

function progressBar(fraction: number, width = 12): string {
  const filled = Math.max(0, Math.min(width, Math.round(fraction * width)));
  return `${'▰'.repeat(filled)}${'▱'.repeat(width - filled)}`;
}

function headline(job: JobRecord, info: PackageInfo): string {
  return `> ${quoteUserText(job.request.prompt, 200)}\n-# ${describeModels(job.request, info)} · seed ${job.request.seed}`;
}

export function queuedMessage(
  job: JobRecord,
  info: PackageInfo,
  position: number,
  state: { restarted?: boolean; paused?: boolean } = {},
): OutgoingMessage {
  const lead = state.restarted ? '♻️ The bot restarted; your job is back in the queue' : '⏳ **Queued**';
  const where = state.paused ? '⏸️ the queue of this server is paused by its moderators; your job starts when they resume it' : `position ${position}`;
  return {
    content: `${lead} — ${where}\n${headline(job, info)}`,
    mentionUserIds: [],
  };
}

export function startingMessage(job: JobRecord, info: PackageInfo): OutgoingMessage {
  return { content: `🎨 **${KIND_VERBS[job.kind]}** — starting…\n${headline(job, info)}`, mentionUserIds: [] };
}

export function progressMessage(
  job: JobRecord,
  info: PackageInfo,
  progress: { step: number; steps: number; stage?: string },
  preview?: OutgoingFile,
): OutgoingMessage {
  const stage = progress.stage ? ` · ${progress.stage}` : '';
  const message: OutgoingMessage = {
    content:
      `🎨 **${KIND_VERBS[job.kind]}** — step ${progress.step}/${progress.steps} ` +
      `${progressBar(progress.step / progress.steps)}${stage}\n${headline(job, info)}`,
    mentionUserIds: [],
  };
  if (preview) {
    message.files = [preview];
    message.embeds = [new EmbedBuilder().setColor(0x5865f2).setImage(`attachment://${preview.name}`).setFooter({ text: 'preview' }).toJSON()];
  }
  return message;
}

export function resultButtons(job: JobRecord, options: { contributions: boolean; compare: boolean }): APIActionRowComponent<APIButtonComponentWithCustomId> {
  return new ActionRowBuilder<ButtonBuilder>()
    .addComponents(
      new ButtonBuilder().setCustomId(buttonId('reroll', job.id)).setLabel('Reroll').setEmoji('🔁').setStyle(ButtonStyle.Primary),
      new ButtonBuilder()
        .setCustomId(buttonId('panel', job.id))
        .setLabel('Contributions')
        .setEmoji('🧩')
        .setStyle(ButtonStyle.Secondary)
        .setDisabled(!options.contributions),
      new ButtonBuilder()
        .setCustomId(buttonId('compare', job.id))
        .setLabel('Compare')
        .setEmoji('🔍')
        .setStyle(ButtonStyle.Secondary)
        .setDisabled(!options.compare),
      new ButtonBuilder().setCustomId(buttonId('delete', job.id)).setLabel('Delete').setEmoji('🗑️').setStyle(ButtonStyle.Danger),
    )
    .toJSON() as APIActionRowComponent<APIButtonComponentWithCustomId>;
}

/**
 * 🎨 Vary (Subtle), 🎨 Vary (Strong) and ⬆️ Upscale ×2 for a result of `count` images (only for
 * packages that can draw from an image): one row of three for one image; for a grid, one row per
 * action of numbered buttons (S1…, V1…, U1…, as Midjourney's), so at most 3 rows after resultButtons.
 */
export function imageButtons(job: JobRecord, count: number): APIActionRowComponent<APIButtonComponentWithCustomId>[] {
  const row = (buttons: ButtonBuilder[]) => new ActionRowBuilder<ButtonBuilder>().addComponents(...buttons).toJSON() as APIActionRowComponent<APIButtonComponentWithCustomId>;
  if (count <= 1) {
    return [
      row([
        new ButtonBuilder().setCustomId(buttonId('subtle', job.id)).setLabel('Vary (Subtle)').setEmoji('🎨').setStyle(ButtonStyle.Secondary),
        new ButtonBuilder().setCustomId(buttonId('strong', job.id)).setLabel('Vary (Strong)').setEmoji('🎨').setStyle(ButtonStyle.Secondary),
        new ButtonBuilder().setCustomId(buttonId('upscale', job.id)).setLabel('Upscale ×2').setEmoji('⬆️').setStyle(ButtonStyle.Secondary),
      ]),
    ];
  }
  const numbered = (action: 'subtle' | 'strong' | 'upscale', letter: string, emoji: string) =>
    row(
      Array.from({ length: Math.min(count, 5) }, (_, i) =>
        new ButtonBuilder().setCustomId(buttonId(action, job.id, i)).setLabel(`${letter}${i + 1}`).setEmoji(emoji).setStyle(ButtonStyle.Secondary),
      ),
    );
  return [numbered('subtle', 'S', '🎨'), numbered('strong', 'V', '🎨'), numbered('upscale', 'U', '⬆️')];
}

export function formatSeconds(ms: number): string {
  return ms < 10_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms / 1000)} s`;
}

export function resultEmbed(
  job: JobRecord,
  info: PackageInfo,
  params: ResolvedParams,
  details: { seeds: number[]; elapsedMs: number; imageFile: string; title?: string; warnings?: string[] },
): APIEmbed {
  const embed = new EmbedBuilder()
    .setColor(0x57f287)
    .setTitle(clip(details.title ?? params.prompt, 256))
    .setImage(`attachment://${details.imageFile}`)
    .addFields(
      { name: 'Seed', value: details.seeds.join(', '), inline: true },
      { name: 'Steps', value: String(params.steps), inline: true },
      { name: 'Guidance', value: String(params.guidance), inline: true },
      { name: 'Scheduler', value: schedulerLabel(params.scheduler, params.karras), inline: true },
      { name: 'Mode', value: MODE_LABELS[params.mode]?.title ?? params.mode, inline: true },
      { name: 'Size', value: describeSize(params.width, params.height, info), inline: true },
      { name: 'Time', value: formatSeconds(details.elapsedMs), inline: true },
      { name: 'Models', value: clip(describeModels(params, info), 1024), inline: false },
    )
    .setFooter({ text: clip(`job ${job.id} · ${params.model} · ${params.width}×${params.height}`, 2048) });
  // The title holds 256 characters; longer prompts are shown whole below it.
  if (details.title !== undefined || params.prompt.length > 256) embed.setDescription(clip(params.prompt, 4000));
  if (params.negative) embed.addFields({ name: 'Negative', value: clip(params.negative, 1024) });
  const notes = [...(details.warnings ?? [])];
  if (params.truncatedWords.length > 0) notes.push(`Prompt cut at 75 tokens; dropped: ${params.truncatedWords.join(' ')}`);
  if (notes.length > 0) embed.addFields({ name: 'Note', value: clip(notes.join('\n'), 1024) });
  return embed.toJSON();
}

export function failureMessage(job: JobRecord, info: PackageInfo, reason: string, icon = '⚠️'): OutgoingMessage {
  return { content: `${icon} ${reason}\n${headline(job, info)}` };
}
