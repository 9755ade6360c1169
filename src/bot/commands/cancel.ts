import { MessageFlags, PermissionFlagsBits, InteractionContextType, SlashCommandBuilder, type AutocompleteInteraction, type ChatInputCommandInteraction } from 'discord.js';
import type { BotContext, SlashCommand } from '../context.ts';
import { clip } from '../messages.ts';

const data = new SlashCommandBuilder()
  .setName('cancel')
  // Server channels only: results, reactions and fallbacks are channel messages.
  .setContexts(InteractionContextType.Guild)
  .setDescription('Cancel your queued or running job')
  .addStringOption((o) => o.setName('job').setDescription('Which job (default: your latest)').setAutocomplete(true).setMaxLength(40));

async function execute(interaction: ChatInputCommandInteraction, ctx: BotContext): Promise<void> {
  const reply = (content: string) => interaction.reply({ content, flags: MessageFlags.Ephemeral, allowedMentions: { parse: [] } });
  const wanted = interaction.options.getString('job')?.trim();
  let jobId: string | undefined;
  if (wanted) {
    const job = ctx.store.get(wanted);
    if (!job) return void (await reply(`There is no job \`${clip(wanted, 40)}\`.`));
    const moderator = interaction.memberPermissions?.has(PermissionFlagsBits.ManageMessages) ?? false;
    if (job.userId !== interaction.user.id && !moderator) {
      return void (await reply('That is not your job; only its requester or someone with Manage Messages can cancel it.'));
    }
    jobId = job.id;
  } else {
    const active = ctx.jobs.viewFor(interaction.user.id).jobs;
    // The newest job first: the one the user most likely regrets.
    jobId = active.map((entry) => entry.job).sort((a, b) => b.createdAt - a.createdAt)[0]?.id;
    if (!jobId) return void (await reply('You have no queued or running job.'));
  }
  const outcome = await ctx.jobs.cancel(jobId, interaction.user.id);
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
