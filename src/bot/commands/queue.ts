import { MessageFlags, InteractionContextType, SlashCommandBuilder, type ChatInputCommandInteraction } from 'discord.js';
import type { BotContext, SlashCommand } from '../context.ts';
import { clip } from '../messages.ts';

const data = new SlashCommandBuilder()
  .setName('queue')
  // Server channels only: results, reactions and fallbacks are channel messages.
  .setContexts(InteractionContextType.Guild)
  .setDescription('Your jobs and the queue');

async function execute(interaction: ChatInputCommandInteraction, ctx: BotContext): Promise<void> {
  const view = ctx.jobs.viewFor(interaction.user.id);
  const lines = view.jobs.map(({ job, state, position, held, step, steps }) => {
    const what = `\`${job.id}\` ${clip(job.request.prompt, 60)}`;
    if (state === 'running') return `🎨 ${what} — drawing${step !== undefined ? `, step ${step}/${steps}` : ''}`;
    return held ? `⏸️ ${what} — waiting for the queue to resume` : `⏳ ${what} — position ${position}`;
  });
  const paused =
    interaction.guildId !== null && ctx.guilds.isPaused(interaction.guildId)
      ? '⏸️ **The queue of this server is paused** by its moderators: new jobs are accepted and wait; they start when it is resumed.\n'
      : '';
  const mine = paused + (lines.length > 0 ? lines.join('\n') : 'You have no jobs in the queue.');
  const summary =
    `Queue: ${view.waiting} waiting (at most ${view.maxQueued}), ${view.running} drawing on ` +
    `${view.workers} worker${view.workers === 1 ? '' : 's'}. Limit per person: ${ctx.config.maxJobsPerUser}.`;
  let workers = '';
  if (ctx.describeWorkers) {
    try {
      workers = `\n${await ctx.describeWorkers()}`;
    } catch {
      workers = '\nThe list of GPU workers is not available right now.';
    }
  }
  await interaction.reply({
    content: clip(`${mine}${workers}\n-# ${summary}`, 2000),
    flags: MessageFlags.Ephemeral,
    allowedMentions: { parse: [] },
  });
}

export const queue: SlashCommand = { data, execute };
