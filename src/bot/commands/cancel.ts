import { MessageFlags, InteractionContextType, SlashCommandBuilder, type AutocompleteInteraction, type ChatInputCommandInteraction } from 'discord.js';
import { isModerator } from '../access.ts';
import type { BotContext, SlashCommand } from '../context.ts';
import { clip } from '../messages.ts';

const data = new SlashCommandBuilder()
  .setName('cancel')
  // Server channels only: results, reactions and fallbacks are channel messages.
  .setContexts(InteractionContextType.Guild)
  .setDescription('Cancel your queued or running job (moderators: anyone’s, by id)')
  .addStringOption((o) => o.setName('job').setDescription('Which job (default: your latest)').setAutocomplete(true).setMaxLength(40));

async function execute(interaction: ChatInputCommandInteraction, ctx: BotContext): Promise<void> {
  const reply = (content: string) => interaction.reply({ content, flags: MessageFlags.Ephemeral, allowedMentions: { parse: [] } });
  const wanted = interaction.options.getString('job')?.trim();
  let jobId: string | undefined;
  let byModerator = false;
  if (wanted) {
    const job = ctx.store.get(wanted);
    if (!job) return void (await reply(`There is no job \`${clip(wanted, 40)}\`.`));
    if (job.userId !== interaction.user.id && !isModerator(interaction.memberPermissions)) {
      return void (await reply('That is not your job; only its requester or someone with Manage Messages can cancel it.'));
    }
    // A moderator cancels jobs of this server only.
    if (job.userId !== interaction.user.id && job.guildId !== interaction.guildId) {
      return void (await reply(`There is no job \`${clip(wanted, 40)}\` in this server.`));
    }
    jobId = job.id;
    byModerator = job.userId !== interaction.user.id;
  } else {
    const active = ctx.jobs.viewFor(interaction.user.id).jobs;
    // The newest job first: the one the user most likely regrets.
    jobId = active.map((entry) => entry.job).sort((a, b) => b.createdAt - a.createdAt)[0]?.id;
    if (!jobId) return void (await reply('You have no queued or running job.'));
  }
  const outcome = await ctx.jobs.cancel(jobId, interaction.user.id, { byModerator });
  if (outcome === 'waiting') await reply(`Cancelled \`${jobId}\` before it started.`);
  else if (outcome === 'running') await reply(`Stopping \`${jobId}\`…`);
  else await reply(`\`${jobId}\` is not queued or running any more.`);
}

async function autocomplete(interaction: AutocompleteInteraction, ctx: BotContext): Promise<void> {
  const typed = String(interaction.options.getFocused()).toLowerCase();
  const choices = ctx.jobs
    .viewFor(interaction.user.id)
    .jobs.filter(({ job }) => job.id.toLowerCase().includes(typed) || job.request.prompt.toLowerCase().includes(typed))
    .slice(0, 25)
    .map(({ job, state }) => ({ name: clip(`${state === 'running' ? 'drawing' : 'queued'}: ${job.request.prompt}`, 100), value: job.id }));
  await interaction.respond(choices);
}

export const cancel: SlashCommand = { data, execute, autocomplete };
