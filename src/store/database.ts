// The bot's SQLite database (DATA_DIR/jobs.sqlite): opened once, brought up to the current schema by
// numbered migrations (PRAGMA user_version), shared by the job, user-settings and guild-settings stores.
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';

export type SqliteDatabase = Database.Database;

/**
 * Each migration runs once, in order, in a transaction that also sets user_version to its index + 1.
 * Append new ones; never edit one that has shipped. Databases made before migrations existed have
 * user_version 0 and the jobs table already: migration 1 creates it only if it is missing.
 */
const MIGRATIONS: readonly string[] = [
  // 1: jobs.
  `
  CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    user_id TEXT NOT NULL,
    guild_id TEXT,
    channel_id TEXT NOT NULL,
    request TEXT NOT NULL,
    seed INTEGER NOT NULL,
    reply TEXT NOT NULL,
    parent_job_id TEXT,
    reply_to_message_id TEXT,
    status_message_id TEXT,
    result_message_id TEXT,
    error TEXT,
    result TEXT,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0
  );
  CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created_at);
  CREATE INDEX IF NOT EXISTS jobs_user ON jobs(user_id, status);
  CREATE INDEX IF NOT EXISTS jobs_result_message ON jobs(result_message_id);
  CREATE INDEX IF NOT EXISTS jobs_status_message ON jobs(status_message_id);
  `,
  // 2: /settings, one row per user (a JSON object of the defaults they chose).
  `
  CREATE TABLE user_settings (
    user_id TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    updated_at INTEGER NOT NULL
  );
  `,
  // 3: /admin, per server: paused queue and default daily quota, allowed roles, blocked users,
  // per-user daily quotas; and the index that counts a user's jobs of one day in one server.
  `
  CREATE TABLE guild_settings (
    guild_id TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0,
    daily_quota INTEGER,
    updated_at INTEGER NOT NULL
  );
  CREATE TABLE guild_allowed_roles (
    guild_id TEXT NOT NULL,
    role_id TEXT NOT NULL,
    PRIMARY KEY (guild_id, role_id)
  );
  CREATE TABLE guild_blocked_users (
    guild_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    blocked_by TEXT NOT NULL,
    blocked_at INTEGER NOT NULL,
    PRIMARY KEY (guild_id, user_id)
  );
  CREATE TABLE guild_user_quotas (
    guild_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    daily_quota INTEGER NOT NULL,
    PRIMARY KEY (guild_id, user_id)
  );
  CREATE INDEX jobs_user_day ON jobs(user_id, guild_id, created_at);
  `,
  // 4: image-to-image. The pictures jobs need to run again after a restart, as PNG: a job's init image
  // (role 'init', index 0: already fitted to the request's size, or a result that the job scales up)
  // and a finished job's results (role 'result', one per image), which Vary and Upscale start from.
  `
  CREATE TABLE job_images (
    job_id TEXT NOT NULL,
    role TEXT NOT NULL,
    idx INTEGER NOT NULL,
    png BLOB NOT NULL,
    PRIMARY KEY (job_id, role, idx)
  );
  `,
];

export const SCHEMA_VERSION = MIGRATIONS.length;

/** Applies the migrations this database has not seen yet; returns the versions applied. */
export function migrate(db: SqliteDatabase): number[] {
  const current = db.pragma('user_version', { simple: true }) as number;
  if (current > MIGRATIONS.length) {
    throw new Error(`The database has schema version ${current}, newer than this bot's ${MIGRATIONS.length}; update the bot.`);
  }
  const applied: number[] = [];
  for (let version = current + 1; version <= MIGRATIONS.length; version++) {
    db.transaction(() => {
      db.exec(MIGRATIONS[version - 1]);
      db.pragma(`user_version = ${version}`);
    })();
    applied.push(version);
  }
  return applied;
}

/** Opens (creating folders as needed) and migrates the database; ':memory:' for a throwaway one. */
export function openDatabase(file: string): SqliteDatabase {
  if (file !== ':memory:') mkdirSync(path.dirname(file), { recursive: true });
  const db = new Database(file);
  try {
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = NORMAL');
    db.pragma('busy_timeout = 2000');
    migrate(db);
    return db;
  } catch (error) {
    db.close();
    throw error;
  }
}
