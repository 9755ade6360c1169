// Paces one job's message edits: updates (queue position, progress) are coalesced to the latest and
// sent at most once per interval, never two at a time; the final message waits for the edit in
// flight and cancels the ones still pending.
import type { JobRecord } from '../store/job-store.ts';
import type { Logger } from '../log/logger.ts';
import type { JobMessenger } from './job-messenger.ts';
import type { OutgoingMessage } from './messages.ts';

type MessageFactory = () => OutgoingMessage | Promise<OutgoingMessage>;

/**
 * The first update waits this long (at most one interval) after the acknowledgement, so that under a
 * burst of commands the acknowledgements go out before the status edits (discord.js paces all REST
 * requests at 50 per second).
 */
const FIRST_UPDATE_DELAY_MS = 1000;

export class JobReporter {
  private pending: { make: MessageFactory; key?: string } | undefined;
  private timer: NodeJS.Timeout | undefined;
  private inFlight: Promise<void> | undefined;
  private lastSentAt = -Infinity;
  private lastKey: string | undefined;
  private closed = false;
  private readonly acknowledged: Promise<void>;

  constructor(
    readonly job: JobRecord,
    readonly messenger: JobMessenger,
    private readonly intervalMs: number,
    private readonly logger: Logger,
    /** Resolves once the interaction is acknowledged (deferred); edits wait for it. */
    ack: Promise<unknown> = Promise.resolve(),
    /** The job was restored after a restart (its first update says so). */
    readonly restored = false,
  ) {
    this.lastSentAt = Date.now() - intervalMs + Math.min(intervalMs, FIRST_UPDATE_DELAY_MS);
    this.acknowledged = ack.then(
      () => undefined,
      (error: unknown) => {
        this.logger.warn({ job: job.id, err: error }, 'could not acknowledge the interaction; using channel messages');
        messenger.abandonInteraction();
      },
    );
  }

  /**
   * Shows an update soon: at once if the last edit is older than the interval, else when it is.
   * Updates with the same `key` as the one last shown are skipped.
   */
  update(make: MessageFactory, key?: string): void {
    if (this.closed) return;
    if (key !== undefined && key === this.lastKey) {
      this.pending = undefined;
      return;
    }
    this.pending = { make, key };
    this.schedule();
  }

  /** Sends the final message (with the messenger's retries and fallbacks); returns its message id. */
  async final(message: OutgoingMessage): Promise<string> {
    this.close();
    await this.inFlight;
    await this.acknowledged;
    return this.messenger.deliver(message);
  }

  /** An ephemeral refusal instead of a final message. */
  async refuse(text: string): Promise<void> {
    this.close();
    await this.inFlight;
    await this.acknowledged;
    await this.messenger.refuse(text);
  }

  /** Stops all further updates (pending ones are dropped). */
  close(): void {
    this.closed = true;
    this.pending = undefined;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private schedule(): void {
    if (this.timer || this.inFlight || this.closed) return;
    const wait = Math.max(0, this.lastSentAt + this.intervalMs - Date.now());
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.flush();
    }, wait);
  }

  private flush(): void {
    const next = this.pending;
    if (!next || this.closed) return;
    this.pending = undefined;
    this.inFlight = (async () => {
      await this.acknowledged;
      if (this.closed) return;
      const message = await next.make();
      if (this.closed) return;
      this.lastSentAt = Date.now();
      await this.messenger.update(message);
      this.lastKey = next.key;
    })()
      .catch((error: unknown) => this.logger.debug({ job: this.job.id, err: error }, 'update failed'))
      .finally(() => {
        this.inFlight = undefined;
        if (this.pending) this.schedule();
      });
  }
}
