// /settings: each user's defaults for /imagine, one JSON object per user in the user_settings table.
import { z } from 'zod';
import { MODES, SCHEDULER_NAMES, type Mode, type SchedulerName } from '../engine/api.ts';
import type { SqliteDatabase } from './database.ts';

const settingsSchema = z
  .object({
    /** As typed in /imagine's model option: an ensemble, an expert or experts joined by +. */
    model: z.string().min(1).max(200),
    mode: z.custom<Mode>((v) => typeof v === 'string' && (MODES as readonly string[]).includes(v)),
    steps: z.number().int().positive(),
    guidance: z.number().nonnegative(),
    scheduler: z.custom<SchedulerName>((v) => typeof v === 'string' && (SCHEDULER_NAMES as readonly string[]).includes(v)),
    /** A shape of /imagine's size option. */
    size: z.string().min(1).max(40),
    contributions: z.boolean(),
    /** public: results in the channel; private: ephemeral replies only the requester sees. */
    visibility: z.enum(['public', 'private']),
  })
  .partial();

/** Every field is optional: an absent one means the package default (or /imagine's own option). */
export type UserSettings = z.infer<typeof settingsSchema>;

export const USER_SETTING_KEYS = ['model', 'mode', 'steps', 'guidance', 'scheduler', 'size', 'contributions', 'visibility'] as const;
export type UserSettingKey = (typeof USER_SETTING_KEYS)[number];

/** Keeps what is valid of a stored object (an unreadable field is dropped, not fatal). */
function parseSettings(text: string): UserSettings {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    return {};
  }
  if (typeof raw !== 'object' || raw === null) return {};
  const settings: Record<string, unknown> = {};
  for (const key of USER_SETTING_KEYS) {
    const value = (raw as Record<string, unknown>)[key];
    if (value === undefined) continue;
    const field = settingsSchema.shape[key].safeParse(value);
    if (field.success && field.data !== undefined) settings[key] = field.data;
  }
  return settings as UserSettings;
}

export class UserSettingsStore {
  private readonly statements;

  constructor(db: SqliteDatabase) {
    this.statements = {
      get: db.prepare('SELECT settings FROM user_settings WHERE user_id = ?'),
      put: db.prepare(
        `INSERT INTO user_settings (user_id, settings, updated_at) VALUES (?, ?, ?)
         ON CONFLICT(user_id) DO UPDATE SET settings = excluded.settings, updated_at = excluded.updated_at`,
      ),
      remove: db.prepare('DELETE FROM user_settings WHERE user_id = ?'),
    };
  }

  get(userId: string): UserSettings {
    const row = this.statements.get.get(userId) as { settings: string } | undefined;
    return row ? parseSettings(row.settings) : {};
  }

  /** Replaces the user's settings (an empty object removes the row). */
  set(userId: string, settings: UserSettings, at = Date.now()): void {
    const parsed = settingsSchema.parse(settings);
    const clean = Object.fromEntries(Object.entries(parsed).filter(([, value]) => value !== undefined));
    if (Object.keys(clean).length === 0) this.statements.remove.run(userId);
    else this.statements.put.run(userId, JSON.stringify(clean), at);
  }

  reset(userId: string): void {
    this.statements.remove.run(userId);
  }
}
