import {
  MessageFlags,
  InteractionContextType,
  PermissionFlagsBits,
  SlashCommandBuilder,
  type ChatInputCommandInteraction,
} from 'discord.js';
import { isServerAdmin, utcDay } from '../access.ts';
import type { BotContext, SlashCommand } from '../context.ts';
import { clip } from '../messages.ts';

const MAX_QUOTA = 10_000;

const data = new SlashCommandBuilder()
  .setName('admin')
  .setContexts(InteractionContextType.Guild)
  // Shown to members with Manage Server (server admins can change that in Integrations; the bot checks again).
  .setDefaultMemberPermissions(PermissionFlagsBits.ManageGuild)
  .setDescription('Moderate the bot in this server (Manage Server)')
  .addSubcommand((s) => s.setName('show').setDescription('This server’s settings: queue, roles, quotas, blocked users'))
  .addSubcommand((s) => s.setName('queue').setDescription('Who is drawing and who is waiting, with job ids (for /cancel)'))
  .addSubcommand((s) => s.setName('pause').setDescription('Pause the queue: new jobs are accepted and wait; running ones finish'))
  .addSubcommand((s) => s.setName('resume').setDescription('Resume the queue: waiting jobs start'))
  .addSubcommand((s) =>
    s
      .setName('block')
      .setDescription('Refuse every command, button and reaction of a user here')
      .addUserOption((o) => o.setName('user').setDescription('Who').setRequired(true)),
  )
  .addSubcommand((s) =>
    s
      .setName('unblock')
      .setDescription('Let a blocked user use the bot again')
      .addUserOption((o) => o.setName('user').setDescription('Who').setRequired(true)),
  )
  .addSubcommand((s) =>
    s
      .setName('allow-role')
      .setDescription('Only members with an allowed role may draw (none allowed: everyone)')
      .addRoleOption((o) => o.setName('role').setDescription('The role').setRequired(true)),
  )
  .addSubcommand((s) =>
    s
      .setName('remove-role')
      .setDescription('Remove a role from the allowed roles')
      .addRoleOption((o) => o.setName('role').setDescription('The role').setRequired(true)),
  )
  .addSubcommand((s) =>
    s
      .setName('quota')
      .setDescription('Jobs per person per UTC day: for everyone, or for one user')
      .addIntegerOption((o) => o.setName('jobs').setDescription('Jobs per UTC day').setRequired(true).setMinValue(0).setMaxValue(MAX_QUOTA))
      .addUserOption((o) => o.setName('user').setDescription('Only this user (default: everyone without their own quota)')),
  )
  .addSubcommand((s) =>
    s
      .setName('quota-remove')
      .setDescription('Remove the daily quota of everyone, or one user’s own quota')
      .addUserOption((o) => o.setName('user').setDescription('Only this user’s own quota')),
  );

type Handler = (interaction: ChatInputCommandInteraction, ctx: BotContext, guildId: string) => string;

/** An option's id (user or role) whether or not Discord resolved it. */
function idOption(interaction: ChatInputCommandInteraction, name: string): string | undefined {
  const value = interaction.options.get(name)?.value;
  return value === undefined || value === null ? undefined : String(value);
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

function quotaText(quota: number | null): string {
  return quota === null ? 'no limit' : `${plural(quota, 'job')} per UTC day`;
}

function show(_interaction: ChatInputCommandInteraction, ctx: BotContext, guildId: string): string {
  const s = ctx.guilds.get(guildId);
  const overrides = s.userQuotas.map((q) => `<@${q.userId}>: ${quotaText(q.dailyQuota)}`);
  return [
    `**Queue:** ${s.paused ? '⏸️ paused (new jobs wait)' : 'running'}`,
    `**Who may draw:** ${s.allowedRoleIds.length === 0 ? 'everyone' : `members with ${s.allowedRoleIds.map((id) => `<@&${id}>`).join(', ')}`}`,
    `**Daily quota:** ${quotaText(s.dailyQuota)}${overrides.length > 0 ? `; own quotas: ${overrides.join(', ')}` : ''}`,
    `**Blocked:** ${s.blocked.length === 0 ? 'nobody' : s.blocked.map((b) => `<@${b.userId}>`).join(', ')}`,
    `**Blocked words** (BLOCKED_WORDS, for every server): ${ctx.config.blockedWords.length === 0 ? 'none' : ctx.config.blockedWords.length}`,
  ].join('\n');
}

function queue(_interaction: ChatInputCommandInteraction, ctx: BotContext, guildId: string): string {
  const view = ctx.jobs.viewOfGuild(guildId);
  const lines = view.jobs.map(({ job, state, position, held, step, steps }) => {
    const what = `\`${job.id}\` <@${job.userId}> ${clip(job.request.prompt, 50)}`;
    if (state === 'running') return `🎨 ${what} — drawing${step !== undefined ? `, step ${step}/${steps}` : ''}`;
    return held ? `⏸️ ${what} — waiting (paused)` : `⏳ ${position}. ${what}`;
  });
  const paused = ctx.guilds.isPaused(guildId) ? '⏸️ **Paused**: waiting jobs start after /admin resume.\n' : '';
  const body = lines.length > 0 ? lines.join('\n') : 'No jobs from this server are waiting or drawing.';
  return `${paused}${body}\n-# ${view.waiting} waiting and ${view.running} drawing in all servers. Cancel one with /cancel job:<id>.`;
}

function pause(_interaction: ChatInputCommandInteraction, ctx: BotContext, guildId: string): string {
  if (!ctx.guilds.setPaused(guildId, true, ctx.now())) return 'The queue is already paused.';
  ctx.jobs.pauseChanged();
  return '⏸️ Paused. Running jobs finish; new jobs are accepted and wait until /admin resume.';
}

function resume(_interaction: ChatInputCommandInteraction, ctx: BotContext, guildId: string): string {
  // Counted first: resuming may start some at once.
  const waiting = ctx.jobs.viewOfGuild(guildId).jobs.filter((j) => j.state === 'waiting').length;
  if (!ctx.guilds.setPaused(guildId, false, ctx.now())) return 'The queue is not paused.';
  ctx.jobs.pauseChanged();
  return `▶️ Resumed; ${plural(waiting, 'waiting job')} from this server can start.`;
}

function block(interaction: ChatInputCommandInteraction, ctx: BotContext, guildId: string): string {
  const userId = idOption(interaction, 'user')!;
  if (userId === interaction.user.id) return 'You cannot block yourself.';
  if (interaction.options.getUser('user')?.bot) return 'Bots do not use me; there is nothing to block.';
  if (!ctx.guilds.block(guildId, userId, interaction.user.id, ctx.now())) return `<@${userId}> is already blocked.`;
  const active = ctx.jobs.viewFor(userId).jobs.filter(({ job }) => job.guildId === guildId).length;
  const jobs = active > 0 ? ` Their ${plural(active, 'job')} in the queue stay; cancel them with /cancel job:<id> (see /admin queue).` : '';
  return `⛔ <@${userId}> is blocked here: every command, button and 🔁 of theirs is refused.${jobs}`;
}

function unblock(interaction: ChatInputCommandInteraction, ctx: BotContext, guildId: string): string {
  const userId = idOption(interaction, 'user')!;
  return ctx.guilds.unblock(guildId, userId) ? `<@${userId}> is no longer blocked.` : `<@${userId}> was not blocked.`;
}

function allowRole(interaction: ChatInputCommandInteraction, ctx: BotContext, guildId: string): string {
  const roleId = idOption(interaction, 'role')!;
  if (roleId === guildId) return '@everyone is every member: to let everyone draw, remove all allowed roles instead.';
  const added = ctx.guilds.allowRole(guildId, roleId);
  const roles = ctx.guilds.allowedRoleIds(guildId).map((id) => `<@&${id}>`).join(', ');
  return `${added ? 'Added' : 'Already allowed'}: <@&${roleId}>. Only members with ${roles} may draw here.`;
}

function removeRole(interaction: ChatInputCommandInteraction, ctx: BotContext, guildId: string): string {
  const roleId = idOption(interaction, 'role')!;
  if (!ctx.guilds.removeRole(guildId, roleId)) return `<@&${roleId}> was not an allowed role.`;
  const left = ctx.guilds.allowedRoleIds(guildId);
  return left.length === 0
    ? `Removed <@&${roleId}>. No role is required any more: everyone may draw.`
    : `Removed <@&${roleId}>. Members with ${left.map((id) => `<@&${id}>`).join(', ')} may draw.`;
}

function quota(interaction: ChatInputCommandInteraction, ctx: BotContext, guildId: string): string {
  const jobs = interaction.options.getInteger('jobs', true);
  const userId = idOption(interaction, 'user');
  if (userId === undefined) {
    ctx.guilds.setDailyQuota(guildId, jobs, ctx.now());
    return `Everyone without their own quota may now start ${quotaText(jobs)} here (jobs of the day so far count).`;
  }
  ctx.guilds.setUserQuota(guildId, userId, jobs);
  const day = utcDay(ctx.now());
  const used = ctx.store.countForQuota(userId, guildId, day.from, day.to);
  return `<@${userId}> may now start ${quotaText(jobs)} here; ${plural(used, 'job')} today so far.`;
}

function quotaRemove(interaction: ChatInputCommandInteraction, ctx: BotContext, guildId: string): string {
  const userId = idOption(interaction, 'user');
  if (userId === undefined) {
    ctx.guilds.setDailyQuota(guildId, null, ctx.now());
    return 'The daily quota for everyone is removed (own quotas of users stay; see /admin show).';
  }
  ctx.guilds.setUserQuota(guildId, userId, null);
  return `<@${userId}> has no own quota any more; the quota for everyone applies.`;
}

const HANDLERS: Record<string, Handler> = {
  show,
  queue,
  pause,
  resume,
  block,
  unblock,
  'allow-role': allowRole,
  'remove-role': removeRole,
  quota,
  'quota-remove': quotaRemove,
};

async function execute(interaction: ChatInputCommandInteraction, ctx: BotContext): Promise<void> {
  const reply = (content: string) =>
    interaction.reply({ content: clip(content, 2000), flags: MessageFlags.Ephemeral, allowedMentions: { parse: [] } });
  const guildId = interaction.guildId;
  if (guildId === null) return void (await reply('/admin works in a server.'));
  if (!isServerAdmin(interaction.memberPermissions)) return void (await reply('Only members with Manage Server may use /admin.'));
  const handler = HANDLERS[interaction.options.getSubcommand(true)];
  if (!handler) return void (await reply('I do not know that /admin command any more.'));
  const answer = handler(interaction, ctx, guildId);
  ctx.logger.info({ guild: guildId, by: interaction.user.id, action: interaction.options.getSubcommand(true) }, 'admin');
  await reply(answer);
}

export const admin: SlashCommand = { data, execute };
