// /admin: each server's moderation settings: a paused queue, the roles allowed to draw, blocked
// users, and daily job quotas (a default and per-user overrides).
import type { SqliteDatabase } from './database.ts';

export interface BlockedUser {
  userId: string;
  blockedBy: string;
  blockedAt: number;
}

export interface GuildSettings {
  paused: boolean;
  /** Jobs per person per UTC day; null: no limit. */
  dailyQuota: number | null;
  /** Empty: everyone may draw. */
  allowedRoleIds: string[];
  blocked: BlockedUser[];
  /** Per-user daily quotas that replace the default. */
  userQuotas: { userId: string; dailyQuota: number }[];
}

export class GuildSettingsStore {
  private readonly statements;

  constructor(db: SqliteDatabase) {
    this.statements = {
      guild: db.prepare('SELECT paused, daily_quota FROM guild_settings WHERE guild_id = ?'),
      setPaused: db.prepare(
        `INSERT INTO guild_settings (guild_id, paused, updated_at) VALUES (?, ?, ?)
         ON CONFLICT(guild_id) DO UPDATE SET paused = excluded.paused, updated_at = excluded.updated_at`,
      ),
      setQuota: db.prepare(
        `INSERT INTO guild_settings (guild_id, daily_quota, updated_at) VALUES (?, ?, ?)
         ON CONFLICT(guild_id) DO UPDATE SET daily_quota = excluded.daily_quota, updated_at = excluded.updated_at`,
      ),
      roles: db.prepare('SELECT role_id FROM guild_allowed_roles WHERE guild_id = ? ORDER BY rowid'),
      addRole: db.prepare('INSERT OR IGNORE INTO guild_allowed_roles (guild_id, role_id) VALUES (?, ?)'),
      removeRole: db.prepare('DELETE FROM guild_allowed_roles WHERE guild_id = ? AND role_id = ?'),
      blocked: db.prepare('SELECT 1 FROM guild_blocked_users WHERE guild_id = ? AND user_id = ?'),
      blockedList: db.prepare(
        'SELECT user_id AS userId, blocked_by AS blockedBy, blocked_at AS blockedAt FROM guild_blocked_users WHERE guild_id = ? ORDER BY blocked_at, rowid',
      ),
      block: db.prepare(
        'INSERT OR IGNORE INTO guild_blocked_users (guild_id, user_id, blocked_by, blocked_at) VALUES (?, ?, ?, ?)',
      ),
      unblock: db.prepare('DELETE FROM guild_blocked_users WHERE guild_id = ? AND user_id = ?'),
      userQuota: db.prepare('SELECT daily_quota FROM guild_user_quotas WHERE guild_id = ? AND user_id = ?'),
      userQuotas: db.prepare(
        'SELECT user_id AS userId, daily_quota AS dailyQuota FROM guild_user_quotas WHERE guild_id = ? ORDER BY rowid',
      ),
      setUserQuota: db.prepare(
        `INSERT INTO guild_user_quotas (guild_id, user_id, daily_quota) VALUES (?, ?, ?)
         ON CONFLICT(guild_id, user_id) DO UPDATE SET daily_quota = excluded.daily_quota`,
      ),
      removeUserQuota: db.prepare('DELETE FROM guild_user_quotas WHERE guild_id = ? AND user_id = ?'),
    };
  }

  private row(guildId: string): { paused: number; daily_quota: number | null } | undefined {
    return this.statements.guild.get(guildId) as { paused: number; daily_quota: number | null } | undefined;
  }

  get(guildId: string): GuildSettings {
    const row = this.row(guildId);
    return {
      paused: (row?.paused ?? 0) !== 0,
      dailyQuota: row?.daily_quota ?? null,
      allowedRoleIds: this.allowedRoleIds(guildId),
      blocked: this.statements.blockedList.all(guildId) as BlockedUser[],
      userQuotas: this.statements.userQuotas.all(guildId) as GuildSettings['userQuotas'],
    };
  }

  isPaused(guildId: string): boolean {
    return (this.row(guildId)?.paused ?? 0) !== 0;
  }

  /** Returns whether this changed anything. */
  setPaused(guildId: string, paused: boolean, at = Date.now()): boolean {
    if (this.isPaused(guildId) === paused) return false;
    this.statements.setPaused.run(guildId, paused ? 1 : 0, at);
    return true;
  }

  /** The default daily quota of the server (null: none). */
  setDailyQuota(guildId: string, quota: number | null, at = Date.now()): void {
    this.statements.setQuota.run(guildId, quota, at);
  }

  /** One user's override (null: remove it). */
  setUserQuota(guildId: string, userId: string, quota: number | null): void {
    if (quota === null) this.statements.removeUserQuota.run(guildId, userId);
    else this.statements.setUserQuota.run(guildId, userId, quota);
  }

  /** The daily quota that applies to this user: their override, else the server's default; undefined: none. */
  quotaFor(guildId: string, userId: string): number | undefined {
    const own = this.statements.userQuota.get(guildId, userId) as { daily_quota: number } | undefined;
    if (own) return own.daily_quota;
    return this.row(guildId)?.daily_quota ?? undefined;
  }

  allowedRoleIds(guildId: string): string[] {
    return (this.statements.roles.all(guildId) as { role_id: string }[]).map((row) => row.role_id);
  }

  /** Returns false when the role was already allowed. */
  allowRole(guildId: string, roleId: string): boolean {
    return this.statements.addRole.run(guildId, roleId).changes === 1;
  }

  /** Returns false when the role was not allowed. */
  removeRole(guildId: string, roleId: string): boolean {
    return this.statements.removeRole.run(guildId, roleId).changes === 1;
  }

  isBlocked(guildId: string, userId: string): boolean {
    return this.statements.blocked.get(guildId, userId) !== undefined;
  }

  /** Returns false when the user was already blocked. */
  block(guildId: string, userId: string, blockedBy: string, at = Date.now()): boolean {
    return this.statements.block.run(guildId, userId, blockedBy, at).changes === 1;
  }

  /** Returns false when the user was not blocked. */
  unblock(guildId: string, userId: string): boolean {
    return this.statements.unblock.run(guildId, userId).changes === 1;
  }
}
