import type { GenerateRequest, GenerateResult, ResolvedParams } from '../engine/api.ts';
import { openDatabase, type SqliteDatabase } from './database.ts';

export type JobStatus = 'queued' | 'running' | 'done' | 'failed' | 'cancelled';
/**
 * imagine: a /imagine command; reroll: same request, new seed; panel / compare: renders of a finished
 * job; vary / upscale: image-to-image from one of a finished job's results (🎨 Vary, ⬆️ Upscale).
 */
export type JobKind = 'imagine' | 'reroll' | 'panel' | 'compare' | 'vary' | 'upscale';

/** What a stored job picture is: the job's init image, or one of its results. */
export type JobImageRole = 'init' | 'result';

/** Where a job's messages go. */
export type ReplyRoute =
  /** Edits of an interaction's original response while its token lives (15 min). */
  | {
      type: 'interaction';
      applicationId: string;
      interactionId: string;
      token: string;
      tokenIssuedAt: number;
      /**
       * The response is ephemeral (the requester's /settings visibility is private): it is never
       * moved to a channel message, where everyone would see it.
       */
      ephemeral?: boolean;
    }
  /** Channel messages (reaction reruns, and every job once its token has expired). */
  | { type: 'channel' };

export interface JobResultSummary {
  params: ResolvedParams;
  seeds: number[];
  timings: GenerateResult['timings'];
  warnings: string[];
}

export interface JobRecord {
  id: string;
  kind: JobKind;
  status: JobStatus;
  userId: string;
  guildId: string | null;
  channelId: string;
  request: GenerateRequest;
  reply: ReplyRoute;
  /** The job this one derives from (reroll, panel, compare). */
  parentJobId: string | null;
  /** A channel message to reply to (the original of a reaction rerun). */
  replyToMessageId: string | null;
  /** The message that shows queue position and progress (and, usually, the result). */
  statusMessageId: string | null;
  /** The message that carries the finished image. */
  resultMessageId: string | null;
  error: string | null;
  result: JobResultSummary | null;
  createdAt: number;
  startedAt: number | null;
  finishedAt: number | null;
  /** How many times the job was started (a restart mid-run starts it again). */
  attempts: number;
  deleted: boolean;
}

export type NewJob = Pick<
  JobRecord,
  'id' | 'kind' | 'userId' | 'guildId' | 'channelId' | 'request' | 'reply' | 'parentJobId' | 'replyToMessageId'
> & {
  createdAt?: number;
  /** Image-to-image: the init picture as PNG, stored with the job (the request's JSON never holds it). */
  initImagePng?: Uint8Array;
};

interface JobRow {
  id: string;
  kind: JobKind;
  status: JobStatus;
  user_id: string;
  guild_id: string | null;
  channel_id: string;
  request: string;
  seed: number;
  reply: string;
  parent_job_id: string | null;
  reply_to_message_id: string | null;
  status_message_id: string | null;
  result_message_id: string | null;
  error: string | null;
  result: string | null;
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
  attempts: number;
  deleted: number;
}

function fromRow(row: JobRow): JobRecord {
  return {
    id: row.id,
    kind: row.kind,
    status: row.status,
    userId: row.user_id,
    guildId: row.guild_id,
    channelId: row.channel_id,
    request: JSON.parse(row.request) as GenerateRequest,
    reply: JSON.parse(row.reply) as ReplyRoute,
    parentJobId: row.parent_job_id,
    replyToMessageId: row.reply_to_message_id,
    statusMessageId: row.status_message_id,
    resultMessageId: row.result_message_id,
    error: row.error,
    result: row.result === null ? null : (JSON.parse(row.result) as JobResultSummary),
    createdAt: row.created_at,
    startedAt: row.started_at,
    finishedAt: row.finished_at,
    attempts: row.attempts,
    deleted: row.deleted !== 0,
  };
}

/** Every job the bot accepted, in SQLite (better-sqlite3: synchronous, a few µs per statement). */
export class JobStore {
  /** The database (shared with the settings stores); closing the job store closes it. */
  readonly db: SqliteDatabase;
  private readonly statements;

  /** A file name (opened and migrated here) or a database from openDatabase. */
  constructor(file: string | SqliteDatabase) {
    this.db = typeof file === 'string' ? openDatabase(file) : file;
    this.statements = {
      insert: this.db.prepare(
        `INSERT INTO jobs (id, kind, status, user_id, guild_id, channel_id, request, seed, reply, parent_job_id,
           reply_to_message_id, created_at)
         VALUES (@id, @kind, 'queued', @userId, @guildId, @channelId, @request, @seed, @reply, @parentJobId,
           @replyToMessageId, @createdAt)`,
      ),
      get: this.db.prepare('SELECT * FROM jobs WHERE id = ?'),
      markRunning: this.db.prepare(
        `UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1 WHERE id = ? AND status IN ('queued', 'running')`,
      ),
      finish: this.db.prepare(
        `UPDATE jobs SET status = @status, error = @error, result = @result, finished_at = @finishedAt WHERE id = @id`,
      ),
      requeue: this.db.prepare(`UPDATE jobs SET status = 'queued' WHERE id = ? AND status = 'running'`),
      setStatusMessage: this.db.prepare('UPDATE jobs SET status_message_id = ? WHERE id = ?'),
      setResultMessage: this.db.prepare('UPDATE jobs SET result_message_id = ? WHERE id = ?'),
      setReply: this.db.prepare('UPDATE jobs SET reply = ? WHERE id = ?'),
      moveToChannel: this.db.prepare(
        `UPDATE jobs SET reply = '{"type":"channel"}', status_message_id = NULL, reply_to_message_id = ? WHERE id = ?`,
      ),
      markDeleted: this.db.prepare('UPDATE jobs SET deleted = 1 WHERE id = ?'),
      byMessage: this.db.prepare(
        `SELECT * FROM jobs WHERE result_message_id = ? OR status_message_id = ? ORDER BY result_message_id = ? DESC, created_at DESC LIMIT 1`,
      ),
      unfinished: this.db.prepare(`SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY created_at, rowid`),
      activeOfUser: this.db.prepare(
        `SELECT * FROM jobs WHERE user_id = ? AND status IN ('queued', 'running') ORDER BY created_at, rowid`,
      ),
      recentOfUser: this.db.prepare(`SELECT * FROM jobs WHERE user_id = ? ORDER BY created_at DESC, rowid DESC LIMIT ?`),
      putImage: this.db.prepare('INSERT OR REPLACE INTO job_images (job_id, role, idx, png) VALUES (?, ?, ?, ?)'),
      getImage: this.db.prepare('SELECT png FROM job_images WHERE job_id = ? AND role = ? AND idx = ?'),
      countForQuota: this.db.prepare(
        `SELECT COUNT(*) AS n FROM jobs WHERE user_id = @userId AND guild_id IS @guildId AND created_at >= @from AND created_at < @to
           AND NOT (started_at IS NULL AND status IN ('cancelled', 'failed'))`,
      ),
    };
  }

  create(job: NewJob): JobRecord {
    // The init image lives in job_images, never in the request's JSON.
    const { initImage: _initImage, ...request } = job.request;
    this.db.transaction(() => {
      this.insert(job, request);
      if (job.initImagePng) this.putImage(job.id, 'init', 0, job.initImagePng);
    })();
    return this.get(job.id)!;
  }

  private insert(job: NewJob, request: GenerateRequest): void {
    this.statements.insert.run({
      id: job.id,
      kind: job.kind,
      userId: job.userId,
      guildId: job.guildId,
      channelId: job.channelId,
      request: JSON.stringify(request),
      seed: job.request.seed,
      reply: JSON.stringify(job.reply),
      parentJobId: job.parentJobId,
      replyToMessageId: job.replyToMessageId,
      createdAt: job.createdAt ?? Date.now(),
    });
  }

  /** Stores a picture of a job (PNG bytes): its init image, or result `index`. */
  putImage(jobId: string, role: JobImageRole, index: number, png: Uint8Array): void {
    this.statements.putImage.run(jobId, role, index, Buffer.from(png.buffer, png.byteOffset, png.byteLength));
  }

  /** A stored picture of a job (PNG bytes), if any. */
  getImage(jobId: string, role: JobImageRole, index = 0): Buffer | undefined {
    const row = this.statements.getImage.get(jobId, role, index) as { png: Buffer } | undefined;
    return row?.png;
  }

  get(id: string): JobRecord | undefined {
    const row = this.statements.get.get(id) as JobRow | undefined;
    return row && fromRow(row);
  }

  /** Returns false when the job is no longer queued or running (e.g. cancelled meanwhile). */
  markRunning(id: string, at = Date.now()): boolean {
    return this.statements.markRunning.run(at, id).changes === 1;
  }

  finish(
    id: string,
    status: Extract<JobStatus, 'done' | 'failed' | 'cancelled'>,
    details: { error?: string; result?: JobResultSummary; at?: number } = {},
  ): void {
    this.statements.finish.run({
      id,
      status,
      error: details.error ?? null,
      result: details.result ? JSON.stringify(details.result) : null,
      finishedAt: details.at ?? Date.now(),
    });
  }

  /** A job interrupted by a shutdown goes back to queued. */
  requeue(id: string): void {
    this.statements.requeue.run(id);
  }

  setStatusMessage(id: string, messageId: string): void {
    this.statements.setStatusMessage.run(messageId, id);
  }

  setResultMessage(id: string, messageId: string): void {
    this.statements.setResultMessage.run(messageId, id);
  }

  setReply(id: string, reply: ReplyRoute): void {
    this.statements.setReply.run(JSON.stringify(reply), id);
  }

  /** From now on the job posts channel messages (replying to `replyToMessageId`, if any). */
  moveToChannel(id: string, replyToMessageId: string | null): void {
    this.statements.moveToChannel.run(replyToMessageId, id);
  }

  markDeleted(id: string): void {
    this.statements.markDeleted.run(id);
  }

  /** The job whose result (or status) message this is. */
  findByMessage(messageId: string): JobRecord | undefined {
    const row = this.statements.byMessage.get(messageId, messageId, messageId) as JobRow | undefined;
    return row && fromRow(row);
  }

  /** Jobs that were queued or running, oldest first (to run again after a restart). */
  unfinished(): JobRecord[] {
    return (this.statements.unfinished.all() as JobRow[]).map(fromRow);
  }

  activeOfUser(userId: string): JobRecord[] {
    return (this.statements.activeOfUser.all(userId) as JobRow[]).map(fromRow);
  }

  recentOfUser(userId: string, limit = 10): JobRecord[] {
    return (this.statements.recentOfUser.all(userId, limit) as JobRow[]).map(fromRow);
  }

  /**
   * A user's jobs in one server created in [from, to) that count against a daily quota: every job
   * accepted, except those that ended before they started (cancelled while waiting, refused by the queue).
   */
  countForQuota(userId: string, guildId: string | null, from: number, to: number): number {
    return (this.statements.countForQuota.get({ userId, guildId, from, to }) as { n: number }).n;
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}
