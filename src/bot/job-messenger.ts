// Sends one job's messages wherever they can still go: edits of the interaction's original response
// while its token lives, channel messages after that (token older than 15 min, error 50027, the
// response deleted) or when Discord keeps failing. Final results are retried and never dropped
// silently; progress edits are best effort. A private (ephemeral) job never moves to the channel:
// when its interaction can no longer be used, its messages are not delivered (UndeliverableError).
import { DiscordAPIError, HTTPError, MessageFlags, Routes, type REST } from 'discord.js';
import type { JobRecord, JobStore } from '../store/job-store.ts';
import type { Logger } from '../log/logger.ts';
import type { OutgoingMessage } from './messages.ts';

/** Discord's interaction token lifetime. */
export const INTERACTION_TOKEN_LIFETIME_MS = 15 * 60 * 1000;
/** Switch to channel messages a little before the token actually expires. */
const TOKEN_SAFETY_MARGIN_MS = 30 * 1000;

export type DeliveryFailure = 'token_expired' | 'message_gone' | 'too_large' | 'transient' | 'fatal';

/** A private job's interaction can no longer be used, and its messages must not go to the channel. */
export class UndeliverableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UndeliverableError';
  }
}

export function classifyDiscordError(error: unknown): DeliveryFailure {
  if (error instanceof UndeliverableError) return 'fatal';
  if (error instanceof DiscordAPIError) {
    if (error.code === 50027 || error.code === 10015 || error.status === 401) return 'token_expired';
    if (error.code === 10008) return 'message_gone';
    if (error.code === 40005 || error.status === 413) return 'too_large';
    if (error.status === 429) return 'transient';
    return 'fatal';
  }
  if (error instanceof HTTPError) return error.status >= 500 || error.status === 429 ? 'transient' : 'fatal';
  // Network errors and request timeouts.
  return 'transient';
}

export interface MessengerOptions {
  rest: REST;
  store: JobStore;
  logger: Logger;
  /** Tries per route (each already includes discord.js's own retries of 5xx) before falling back. */
  attemptsPerRoute?: number;
  retryDelayMs?: number;
  tokenLifetimeMs?: number;
}

interface RestBody {
  content: string;
  embeds: unknown[];
  components: unknown[];
  attachments: { id: number; filename: string }[];
  allowed_mentions: { parse: never[]; users: string[]; replied_user: boolean };
  message_reference?: { message_id: string; fail_if_not_exists: boolean };
}

function restBody(message: OutgoingMessage): { body: RestBody; files: { name: string; data: Buffer }[] } {
  const files = message.files ?? [];
  return {
    body: {
      content: message.content,
      embeds: message.embeds ?? [],
      components: message.components ?? [],
      attachments: files.map((file, index) => ({ id: index, filename: file.name })),
      allowed_mentions: { parse: [], users: message.mentionUserIds ?? [], replied_user: false },
    },
    files: files.map((file) => ({ name: file.name, data: file.data })),
  };
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

export class JobMessenger {
  private job: JobRecord;
  private readonly attemptsPerRoute: number;
  private readonly retryDelayMs: number;
  private readonly tokenLifetimeMs: number;

  constructor(
    job: JobRecord,
    private readonly options: MessengerOptions,
  ) {
    this.job = job;
    this.attemptsPerRoute = options.attemptsPerRoute ?? 3;
    this.retryDelayMs = options.retryDelayMs ?? 1000;
    this.tokenLifetimeMs = options.tokenLifetimeMs ?? INTERACTION_TOKEN_LIFETIME_MS;
  }

  get usesInteraction(): boolean {
    return this.job.reply.type === 'interaction';
  }

  /** Ephemeral responses only the requester sees (never moved to the channel). */
  get isPrivate(): boolean {
    return this.job.reply.type === 'interaction' && this.job.reply.ephemeral === true;
  }

  /** A progress or queue update: one try (plus a move to the channel if the token is gone); failures are dropped. */
  async update(message: OutgoingMessage): Promise<void> {
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        await this.send(message);
        return;
      } catch (error) {
        const kind = classifyDiscordError(error);
        if ((kind === 'token_expired' || kind === 'message_gone') && attempt === 0 && this.moveToChannel(kind)) continue;
        this.options.logger.debug({ job: this.job.id, kind, err: error }, 'status update dropped');
        return;
      }
    }
  }

  /**
   * The finished job's message. Transient failures are retried, then the job moves from the
   * interaction to a channel message; returns the id of the message that carries the result.
   */
  async deliver(message: OutgoingMessage): Promise<string> {
    let current = message;
    let failuresOnRoute = 0;
    let lastError: unknown;
    for (let round = 0; round < 4 * this.attemptsPerRoute + 4; round++) {
      try {
        return await this.send(current, true);
      } catch (error) {
        lastError = error;
        const kind = classifyDiscordError(error);
        this.options.logger.warn({ job: this.job.id, kind, err: error }, 'delivering a result failed');
        if (kind === 'token_expired' || kind === 'message_gone') {
          if (!this.moveToChannel(kind)) break;
          failuresOnRoute = 0;
        } else if (kind === 'too_large' && (current.files?.length ?? 0) > 0) {
          current = {
            ...message,
            files: [],
            embeds: (message.embeds ?? []).map(({ image: _image, ...embed }) => embed),
            content: `${message.content}\n⚠️ The image was too large to upload here.`.trim(),
          };
        } else if (kind === 'transient') {
          failuresOnRoute++;
          if (failuresOnRoute < this.attemptsPerRoute) {
            await sleep(this.retryDelayMs * 2 ** (failuresOnRoute - 1));
          } else if (this.usesInteraction && this.moveToChannel('transient')) {
            failuresOnRoute = 0;
          } else {
            break;
          }
        } else {
          break;
        }
      }
    }
    throw lastError instanceof Error ? lastError : new Error('the result could not be delivered');
  }

  /**
   * A refusal only the requester should see: an ephemeral follow-up (the public "thinking" response
   * is deleted), or a channel message when there is no interaction to answer.
   */
  async refuse(text: string): Promise<void> {
    const reply = this.job.reply;
    if (reply.type === 'interaction' && !this.tokenExpired()) {
      try {
        await this.options.rest.post(Routes.webhook(reply.applicationId, reply.token), {
          body: { content: text, flags: MessageFlags.Ephemeral, allowed_mentions: { parse: [] } },
          auth: false,
        });
        await this.options.rest
          .delete(Routes.webhookMessage(reply.applicationId, reply.token, '@original'), { auth: false })
          .catch((error: unknown) => this.options.logger.debug({ job: this.job.id, err: error }, 'could not delete the response'));
        return;
      } catch (error) {
        this.options.logger.debug({ job: this.job.id, err: error }, 'ephemeral refusal failed; using a public message');
      }
    }
    await this.deliver({ content: `<@${this.job.userId}> ${text}`, mentionUserIds: [this.job.userId] });
  }

  /** Adds a reaction as the bot (best effort: it shows people they can react to rerun). */
  async react(messageId: string, emoji: string): Promise<void> {
    try {
      await this.options.rest.put(Routes.channelMessageOwnReaction(this.job.channelId, messageId, encodeURIComponent(emoji)));
    } catch (error) {
      this.options.logger.debug({ job: this.job.id, err: error }, 'could not add a reaction');
    }
  }

  /** The interaction was never acknowledged: its token is useless, so talk in the channel. */
  abandonInteraction(): void {
    this.moveToChannel('not_acknowledged');
  }

  tokenExpired(): boolean {
    const reply = this.job.reply;
    const margin = Math.min(TOKEN_SAFETY_MARGIN_MS, this.tokenLifetimeMs / 20);
    return reply.type === 'interaction' && Date.now() - reply.tokenIssuedAt > this.tokenLifetimeMs - margin;
  }

  /** Returns false for a private job, which stays on its interaction. */
  private moveToChannel(why: string): boolean {
    if (this.job.reply.type === 'channel') {
      if (why === 'message_gone') this.forgetStatusMessage();
      return true;
    }
    if (this.isPrivate) {
      this.options.logger.info({ job: this.job.id, why }, 'a private job cannot continue in the channel; its messages are not delivered');
      return false;
    }
    this.options.logger.info({ job: this.job.id, why }, 'continuing with channel messages');
    // The interaction's response cannot be edited any more: new channel messages reply to it.
    const replyTo = why === 'message_gone' ? this.job.replyToMessageId : (this.job.statusMessageId ?? this.job.replyToMessageId);
    this.job = { ...this.job, reply: { type: 'channel' }, statusMessageId: null, replyToMessageId: replyTo };
    this.options.store.moveToChannel(this.job.id, replyTo);
    return true;
  }

  private forgetStatusMessage(): void {
    this.job = { ...this.job, statusMessageId: null };
  }

  private async send(message: OutgoingMessage, final = false): Promise<string> {
    if (this.tokenExpired() && !this.moveToChannel('token_expired')) {
      throw new UndeliverableError('The interaction of this private job has expired; its result is not posted in the channel.');
    }
    const { body, files } = restBody(message);
    const reply = this.job.reply;
    if (reply.type === 'interaction') {
      const sent = (await this.options.rest.patch(Routes.webhookMessage(reply.applicationId, reply.token, '@original'), {
        body,
        files,
        auth: false,
      })) as { id: string };
      this.rememberStatusMessage(sent.id);
      return sent.id;
    }
    const userMention = `<@${this.job.userId}>`;
    if (!body.content.includes(userMention)) body.content = `${userMention} ${body.content}`;
    const previousStatus = this.job.statusMessageId;
    if (previousStatus && !final) {
      const sent = (await this.options.rest.patch(Routes.channelMessage(this.job.channelId, previousStatus), { body, files })) as {
        id: string;
      };
      return sent.id;
    }
    // A final result in the channel is a new message (edits do not notify the requester); the status
    // message it replaces is removed.
    const mentions = new Set(body.allowed_mentions.users);
    if (final) mentions.add(this.job.userId);
    const sent = (await this.options.rest.post(Routes.channelMessages(this.job.channelId), {
      body: {
        ...body,
        allowed_mentions: { ...body.allowed_mentions, users: [...mentions] },
        ...(this.job.replyToMessageId ? { message_reference: { message_id: this.job.replyToMessageId, fail_if_not_exists: false } } : {}),
      },
      files,
    })) as { id: string };
    this.rememberStatusMessage(sent.id);
    if (previousStatus) {
      // not awaited: the job counts as delivered once its result is posted, so a button pressed on the
      // new message never finds it unfinished while the old status message is being removed
      void this.options.rest
        .delete(Routes.channelMessage(this.job.channelId, previousStatus))
        .catch((error: unknown) => this.options.logger.debug({ job: this.job.id, err: error }, 'could not remove the status message'));
    }
    return sent.id;
  }

  private rememberStatusMessage(messageId: string): void {
    if (this.job.statusMessageId === messageId) return;
    this.job = { ...this.job, statusMessageId: messageId };
    this.options.store.setStatusMessage(this.job.id, messageId);
  }
}
