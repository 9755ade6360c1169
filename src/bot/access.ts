// Who may do what in a server, from its /admin settings: blocked users are refused everything; new
// jobs (/imagine, buttons, 🔁) need an allowed role, when the server has set any, and room in the
// daily quota (jobs per UTC day). Checks are synchronous, so that a check and the submit right after
// it see the same state.
import { PermissionFlagsBits, type APIInteractionGuildMember, type GuildMember, type PermissionsBitField } from 'discord.js';
import type { BotContext } from './context.ts';
import { blockedWordProblem } from './imagine-request.ts';
import type { GenerateRequest } from '../engine/api.ts';

const DAY_MS = 24 * 60 * 60 * 1000;

/** The UTC day around `now`: [from, to). */
export function utcDay(now: number): { from: number; to: number } {
  const from = Math.floor(now / DAY_MS) * DAY_MS;
  return { from, to: from + DAY_MS };
}

function untilText(ms: number): string {
  const minutes = Math.max(1, Math.ceil(ms / 60_000));
  const hours = Math.floor(minutes / 60);
  return hours > 0 ? `${hours} h ${minutes % 60} min` : `${minutes} min`;
}

export const BLOCKED_MESSAGE = 'You are blocked from using this bot in this server. Ask its moderators if you think this is a mistake.';

/** The refusal for a blocked user, if this one is. */
export function blockedRefusal(ctx: BotContext, guildId: string | null, userId: string): string | undefined {
  return guildId !== null && ctx.guilds.isBlocked(guildId, userId) ? BLOCKED_MESSAGE : undefined;
}

/** The role ids of an interaction's or a cached member (none outside servers). */
export function memberRoleIds(member: GuildMember | APIInteractionGuildMember | null | undefined): string[] {
  if (!member) return [];
  return Array.isArray(member.roles) ? member.roles : [...member.roles.cache.keys()];
}

/** Manage Server: may use /admin. */
export function isServerAdmin(permissions: Readonly<PermissionsBitField> | null | undefined): boolean {
  return permissions?.has(PermissionFlagsBits.ManageGuild) ?? false;
}

/** Manage Messages: may delete or cancel other people's jobs. */
export function isModerator(permissions: Readonly<PermissionsBitField> | null | undefined): boolean {
  return permissions?.has(PermissionFlagsBits.ManageMessages) ?? false;
}

/**
 * Why this member may not start a job in this server now, if they may not: blocked, no allowed
 * role, or the daily quota used up.
 */
export function jobRefusal(ctx: BotContext, who: { guildId: string | null; userId: string; roleIds: readonly string[] }): string | undefined {
  const { guildId, userId } = who;
  if (guildId === null) return undefined;
  const blocked = blockedRefusal(ctx, guildId, userId);
  if (blocked) return blocked;
  const allowed = ctx.guilds.allowedRoleIds(guildId);
  if (allowed.length > 0 && !allowed.some((role) => who.roleIds.includes(role))) {
    return `Only members with ${allowed.length === 1 ? 'the role' : 'one of the roles'} ${allowed.map((id) => `<@&${id}>`).join(', ')} may draw here.`;
  }
  const quota = ctx.guilds.quotaFor(guildId, userId);
  if (quota !== undefined) {
    const now = ctx.now();
    const day = utcDay(now);
    const used = ctx.store.countForQuota(userId, guildId, day.from, day.to);
    if (quota === 0) return 'Your daily quota in this server is 0 jobs; ask its moderators.';
    if (used >= quota) {
      return (
        `You have used your ${quota} job${quota === 1 ? '' : 's'} for today in this server (daily quota). ` +
        `More at 00:00 UTC, in ${untilText(day.to - now)}.`
      );
    }
  }
  return undefined;
}

/** A rerun (🔁, Reroll, Contributions, Compare) of a request whose prompts now hold a blocked word is refused. */
export function rerunRefusal(ctx: BotContext, request: Pick<GenerateRequest, 'prompt' | 'negative'>): string | undefined {
  const problem = blockedWordProblem(request, ctx.config.blockedWords);
  return problem && `I cannot draw this again: ${problem.charAt(0).toLowerCase()}${problem.slice(1)}`;
}
