// Over 500 lines on purpose: one server that plays Discord (gateway, REST routes, interactions, failures) for the tests and bench:bot.
// A fake Discord for the bot's end-to-end tests and bench:bot, with the real discord.js client: the gateway
// (WebSocket on /gateway, found through GET /api/v10/gateway/bot) and the REST routes the bot uses,
// on 127.0.0.1. It keeps messages and interactions like Discord does, enforces the interaction token's
// lifetime (and Discord's 3 s acknowledgement window when asked to), records every request, and can
// inject failures.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { randomBytes } from 'node:crypto';
import { acceptWebSocket, type ServerWebSocket } from './websocket-server.ts';

const DISCORD_EPOCH = 1420070400000n;
let snowflakeCounter = 0n;

/** A real-looking snowflake (17–19 digits) so discord.js's route buckets treat it as an id. */
export function snowflake(): string {
  snowflakeCounter = (snowflakeCounter + 1n) & 0xfffn;
  return (((BigInt(Date.now()) - DISCORD_EPOCH) << 22n) | (1n << 17n) | snowflakeCounter).toString();
}

export const PERMISSIONS = {
  manageGuild: 1n << 5n,
  manageMessages: 1n << 13n,
  sendMessages: 1n << 11n,
  viewChannel: 1n << 10n,
  addReactions: 1n << 6n,
  attachFiles: 1n << 15n,
  embedLinks: 1n << 14n,
  readMessageHistory: 1n << 16n,
  useApplicationCommands: 1n << 31n,
};
const MEMBER_PERMISSIONS =
  PERMISSIONS.sendMessages | PERMISSIONS.viewChannel | PERMISSIONS.addReactions | PERMISSIONS.readMessageHistory |
  PERMISSIONS.useApplicationCommands | PERMISSIONS.attachFiles | PERMISSIONS.embedLinks;

export interface FakeUser {
  id: string;
  username: string;
  bot?: boolean;
  /** Role ids this user has as a member of the server (see FakeDiscord.role). */
  roles?: string[];
}

export interface FakeRole {
  id: string;
  name: string;
}

export interface FakeAttachment {
  id: string;
  filename: string;
  contentType: string;
  data: Buffer;
}

export interface FakeMessage {
  id: string;
  channelId: string;
  authorId: string;
  /** Set for interaction responses and follow-ups (the application id). */
  webhookId?: string;
  interactionId?: string;
  content: string;
  embeds: Record<string, unknown>[];
  components: Record<string, unknown>[];
  attachments: FakeAttachment[];
  flags: number;
  replyTo?: string;
  createdAt: number;
  editedAt?: number;
  deleted: boolean;
  reactions: Map<string, Set<string>>;
  /** Every state the message had, oldest first. */
  history: { at: number; content: string; embeds: Record<string, unknown>[]; attachments: string[] }[];
}

export interface RecordedRequest {
  method: string;
  /** Path below /api/v10, e.g. /channels/1/messages. */
  path: string;
  query: URLSearchParams;
  body: Record<string, unknown> | undefined;
  files: { field: string; name: string; contentType: string; data: Buffer }[];
  status: number;
  at: number;
  auth: string | undefined;
}

export interface FailureRule {
  method?: string;
  path: RegExp;
  status: number;
  /** How many matching requests fail (default: all). */
  times?: number;
  /** For 429s, seconds until retry. */
  retryAfter?: number;
  /** For 429s: the global rate limit (every route waits), not this route's. */
  global?: boolean;
  code?: number;
  message?: string;
}

export type OptionValue = string | number | boolean;

interface CommandOptionDefinition {
  name: string;
  type: number;
  /** A subcommand's (type 1) or subcommand group's (type 2) own options. */
  options?: CommandOptionDefinition[];
}

/** Option types whose values Discord also sends as resolved objects. */
const USER_OPTION = 6;
const ROLE_OPTION = 8;
const ATTACHMENT_OPTION = 11;

/** A file a user attached to a command (attach()): what Discord announces of it, and its bytes. */
export interface FakeUpload extends FakeAttachment {
  /** The size Discord announces (defaults to the data's length). */
  size: number;
  width?: number;
  height?: number;
}
interface CommandDefinition {
  name: string;
  options?: CommandOptionDefinition[];
}

/** Discord's window for the first response to an interaction (later ones get 10062 Unknown interaction). */
export const DISCORD_ACK_WINDOW_MS = 3000;
const EPHEMERAL = 1 << 6;
const LOADING = 1 << 7;

export class FakeInteraction {
  readonly acks: { type: number; at: number; data?: Record<string, unknown> }[] = [];
  originalMessageId?: string;
  readonly followupIds: string[] = [];
  /** Bodies of every edit of the original response, in order. */
  readonly edits: { at: number; body: Record<string, unknown>; files: string[] }[] = [];
  tokenExpired = false;

  constructor(
    private readonly discord: FakeDiscord,
    readonly id: string,
    readonly token: string,
    readonly type: number,
    readonly user: FakeUser,
    readonly channelId: string,
    readonly createdAt: number,
    /** For component interactions: the message the component is on. */
    readonly sourceMessageId?: string,
  ) {}

  get acknowledged(): boolean {
    return this.acks.length > 0;
  }

  get ackLatencyMs(): number | undefined {
    return this.acks[0] ? this.acks[0].at - this.createdAt : undefined;
  }

  get original(): FakeMessage | undefined {
    return this.originalMessageId ? this.discord.messages.get(this.originalMessageId) : undefined;
  }

  get followups(): FakeMessage[] {
    return this.followupIds.map((id) => this.discord.messages.get(id)!);
  }

  /** The choices of an autocomplete answer. */
  get choices(): { name: string; value: string | number }[] | undefined {
    const ack = this.acks.find((a) => a.type === 8);
    return ack?.data?.choices as { name: string; value: string | number }[] | undefined;
  }

  /** Text of an immediate (type 4) reply, or of the first follow-up. */
  get replyContent(): string | undefined {
    const reply = this.acks.find((a) => a.type === 4);
    if (reply) return String(reply.data?.content ?? '');
    return this.followups[0]?.content;
  }

  get replyWasEphemeral(): boolean {
    const reply = this.acks.find((a) => a.type === 4 || a.type === 5);
    return reply !== undefined && ((Number(reply.data?.flags ?? 0) & EPHEMERAL) !== 0);
  }

  waitFor<T>(predicate: (self: this) => T | undefined | false, timeoutMs?: number, what?: string): Promise<T> {
    return this.discord.waitFor(() => predicate(this), timeoutMs, what);
  }
}

export interface FakeDiscordOptions {
  token?: string;
  applicationId?: string;
  /** How long interaction tokens stay valid (Discord: 15 min). */
  tokenLifetimeMs?: number;
  /**
   * Refuse an interaction's first response (10062 Unknown interaction) when it comes later than this
   * after the interaction, as Discord does after DISCORD_ACK_WINDOW_MS. Default: not enforced, because
   * on a busy machine how long the bot takes is the machine's doing, not the bot's; tests prove that
   * the bot acknowledges before any slow work by the order of events instead, and every
   * acknowledgement's latency is still recorded (FakeInteraction.ackLatencyMs).
   */
  ackWindowMs?: number;
  /** Extra text channels besides the default one. */
  extraChannels?: number;
  commands?: CommandDefinition[];
}

export class FakeDiscord {
  readonly token: string;
  readonly applicationId: string;
  readonly guildId = snowflake();
  readonly channelId = snowflake();
  readonly channelIds: string[];
  readonly botUser: FakeUser;
  readonly messages = new Map<string, FakeMessage>();
  readonly interactions = new Map<string, FakeInteraction>();
  readonly requests: RecordedRequest[] = [];
  /** Files attached to commands, by id (attachment option values). */
  private readonly uploads = new Map<string, FakeUpload>();
  /** Ids of the attachments downloaded from the fake's CDN route, in order. */
  readonly attachmentDownloads: string[] = [];
  readonly deployedCommands = new Map<string, Record<string, unknown>[]>();
  readonly gatewayIdentifies: { at: number; intents: number }[] = [];
  /** When set, an identify is answered by closing the connection with this code (e.g. 4004, 4014) instead of READY. */
  refuseIdentifyWith?: number;
  /**
   * When true, a RESUME (op 6) of a session this fake started is answered with RESUMED (events sent
   * while it was away are not replayed); otherwise with "invalid session", so the client identifies again.
   */
  acceptResume = false;
  readonly gatewayResumes: { at: number; sessionId: string }[] = [];
  private readonly gatewaySessions = new Set<string>();
  private readonly interactionsByToken = new Map<string, FakeInteraction>();
  private readonly users = new Map<string, FakeUser>();
  private readonly roles: FakeRole[] = [];
  private readonly commandIds = new Map<string, string>();
  private readonly failures: FailureRule[] = [];
  private readonly sockets = new Set<{ ws: ServerWebSocket; seq: number; identified: boolean }>();
  private readonly tokenLifetimeMs: number;
  private readonly ackWindowMs: number | undefined;
  private commands: CommandDefinition[];
  private server!: Server;
  private port = 0;

  private constructor(options: FakeDiscordOptions) {
    this.token = options.token ?? `fake-token-${randomBytes(12).toString('hex')}`;
    this.applicationId = options.applicationId ?? snowflake();
    this.botUser = { id: this.applicationId, username: 'ensemble-bot', bot: true };
    this.users.set(this.botUser.id, this.botUser);
    this.tokenLifetimeMs = options.tokenLifetimeMs ?? 15 * 60 * 1000;
    this.ackWindowMs = options.ackWindowMs;
    this.channelIds = [this.channelId, ...Array.from({ length: options.extraChannels ?? 1 }, () => snowflake())];
    this.commands = options.commands ?? [];
  }

  static async start(options: FakeDiscordOptions = {}): Promise<FakeDiscord> {
    const fake = new FakeDiscord(options);
    await fake.listen();
    return fake;
  }

  /** Base for discord.js's `rest.api` option. */
  get apiBase(): string {
    return `http://127.0.0.1:${this.port}/api`;
  }

  get gatewayUrl(): string {
    return `ws://127.0.0.1:${this.port}/gateway`;
  }

  setCommands(commands: CommandDefinition[]): void {
    this.commands = commands;
  }

  user(username: string, options: { roles?: string[] } = {}): FakeUser {
    const user: FakeUser = { id: snowflake(), username, ...(options.roles ? { roles: [...options.roles] } : {}) };
    this.users.set(user.id, user);
    return user;
  }

  /** Creates a role in the server (GUILD_ROLE_CREATE); give it to users with `user(name, { roles })`. */
  role(name: string): FakeRole {
    const role = { id: snowflake(), name };
    this.roles.push(role);
    this.dispatch('GUILD_ROLE_CREATE', { guild_id: this.guildId, role: this.roleJson(role, this.roles.length) });
    return role;
  }

  failRequests(rule: FailureRule): void {
    this.failures.push({ ...rule });
  }

  clearFailures(): void {
    this.failures.length = 0;
  }

  /** Makes an interaction's token invalid (as after 15 minutes): webhook calls answer 401 / 50027. */
  expireToken(interaction: FakeInteraction): void {
    interaction.tokenExpired = true;
  }

  // ---- driving the bot -------------------------------------------------------------------------

  /**
   * Sends a chat-input command; options are typed from the command definitions. A subcommand goes
   * after the command's name, as Discord shows it: `slash('admin quota', { jobs: 2 })`. User and role
   * options take ids, and come with their resolved users, members and roles.
   */
  slash(
    name: string,
    options: Record<string, OptionValue | undefined> = {},
    by: { user: FakeUser; channelId?: string; permissions?: bigint } = { user: this.user('someone') },
  ): FakeInteraction {
    return this.commandInteraction(2, name, options, undefined, by);
  }

  /**
   * A file a user uploads with a command: returns its id, the value of an attachment option. `size`,
   * `width` and `height` are what Discord announces (size defaults to the data's length).
   */
  attach(data: Buffer, details: { filename: string; contentType: string; size?: number; width?: number; height?: number }): string {
    const id = snowflake();
    this.uploads.set(id, { id, data, filename: details.filename, contentType: details.contentType, size: details.size ?? data.length, width: details.width, height: details.height });
    return id;
  }

  /** Sends an autocomplete request with `focused` as the option being typed. */
  autocomplete(
    name: string,
    options: Record<string, OptionValue | undefined>,
    focused: string,
    by: { user: FakeUser; channelId?: string } = { user: this.user('someone') },
  ): FakeInteraction {
    return this.commandInteraction(4, name, options, focused, by);
  }

  /** Presses a button on a message. */
  pressButton(
    messageId: string,
    customId: string,
    by: { user: FakeUser; permissions?: bigint },
  ): FakeInteraction {
    const message = this.messages.get(messageId);
    if (!message) throw new Error(`no message ${messageId}`);
    const interaction = this.newInteraction(3, by.user, message.channelId, messageId);
    this.dispatch('INTERACTION_CREATE', {
      ...this.interactionBase(interaction, by.permissions),
      data: { custom_id: customId, component_type: 2 },
      message: this.messageJson(message),
    });
    return interaction;
  }

  /** A user adds a reaction (unicode emoji) to a message. */
  react(messageId: string, emoji: string, user: FakeUser): void {
    const message = this.messages.get(messageId);
    if (!message) throw new Error(`no message ${messageId}`);
    this.addReaction(message, emoji, user.id);
  }

  /** All buttons (custom ids) on a message. */
  buttonsOf(message: FakeMessage): { customId: string; label?: string; disabled: boolean }[] {
    return message.components.flatMap((row) =>
      ((row.components as Record<string, unknown>[] | undefined) ?? []).map((c) => ({
        customId: String(c.custom_id),
        label: c.label as string | undefined,
        disabled: Boolean(c.disabled),
      })),
    );
  }

  channelMessages(channelId = this.channelId): FakeMessage[] {
    return [...this.messages.values()].filter((m) => m.channelId === channelId && m.interactionId === undefined && !m.webhookId);
  }

  requestsTo(method: string, path: RegExp): RecordedRequest[] {
    return this.requests.filter((r) => r.method === method && path.test(r.path));
  }

  async waitFor<T>(predicate: () => T | undefined | false, timeoutMs = 10_000, what = 'condition'): Promise<T> {
    const started = Date.now();
    for (;;) {
      const value = predicate();
      if (value !== undefined && value !== false) return value;
      if (Date.now() - started > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }

  /** Drops every gateway connection without a close frame. */
  dropGateway(): void {
    for (const socket of this.sockets) socket.ws.terminate();
  }

  /**
   * Closes every gateway connection with a close frame carrying `code`, as Discord does: 4004 after
   * the token was reset, 4000/4009/1001 and others when the client should resume or reconnect.
   */
  closeGateway(code: number, reason = ''): void {
    for (const socket of this.sockets) socket.ws.close(code, reason);
  }

  /** Stops answering on every gateway connection, the close handshake included (a hung connection). */
  freezeGateway(): void {
    for (const socket of this.sockets) socket.ws.stopReading();
  }

  async close(): Promise<void> {
    for (const socket of this.sockets) socket.ws.terminate();
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  // ---- gateway ---------------------------------------------------------------------------------

  dispatch(type: string, data: unknown): void {
    for (const socket of this.sockets) {
      if (!socket.identified) continue;
      socket.seq++;
      socket.ws.sendText(JSON.stringify({ op: 0, t: type, s: socket.seq, d: data }));
    }
  }

  private onGatewayConnection(ws: ServerWebSocket): void {
    const socket = { ws, seq: 0, identified: false };
    this.sockets.add(socket);
    ws.on('close', () => this.sockets.delete(socket));
    ws.sendText(JSON.stringify({ op: 10, d: { heartbeat_interval: 41_250 } }));
    ws.on('message', (raw: string | Buffer) => {
      const payload = JSON.parse(raw.toString()) as { op: number; d: Record<string, unknown> };
      switch (payload.op) {
        case 1:
          ws.sendText(JSON.stringify({ op: 11 }));
          break;
        case 2: {
          if (payload.d.token !== this.token) {
            ws.close(4004, 'Authentication failed.');
            return;
          }
          if (this.refuseIdentifyWith !== undefined) {
            ws.close(this.refuseIdentifyWith, 'Refused by the test.');
            return;
          }
          this.gatewayIdentifies.push({ at: Date.now(), intents: Number(payload.d.intents) });
          socket.identified = true;
          socket.seq++;
          ws.sendText(
            JSON.stringify({
              op: 0,
              t: 'READY',
              s: socket.seq,
              d: {
                v: 10,
                user: this.userJson(this.botUser),
                guilds: [{ id: this.guildId, unavailable: true }],
                session_id: this.newGatewaySession(),
                resume_gateway_url: this.gatewayUrl,
                shard: [0, 1],
                application: { id: this.applicationId, flags: 0 },
              },
            }),
          );
          socket.seq++;
          ws.sendText(JSON.stringify({ op: 0, t: 'GUILD_CREATE', s: socket.seq, d: this.guildJson() }));
          break;
        }
        case 6: {
          const sessionId = String(payload.d.session_id);
          if (!this.acceptResume || payload.d.token !== this.token || !this.gatewaySessions.has(sessionId)) {
            // No session resumption: tell the client to identify again.
            ws.sendText(JSON.stringify({ op: 9, d: false }));
            break;
          }
          this.gatewayResumes.push({ at: Date.now(), sessionId });
          socket.identified = true;
          socket.seq = Number(payload.d.seq ?? 0) + 1;
          ws.sendText(JSON.stringify({ op: 0, t: 'RESUMED', s: socket.seq, d: {} }));
          break;
        }
        default:
          break;
      }
    });
  }

  private newGatewaySession(): string {
    const id = randomBytes(8).toString('hex');
    this.gatewaySessions.add(id);
    return id;
  }

  // ---- REST ------------------------------------------------------------------------------------

  private async listen(): Promise<void> {
    this.server = createServer((req, res) => {
      void this.onRequest(req, res).catch((error: unknown) => {
        res.writeHead(500, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ message: `fake discord crashed: ${String(error)}`, code: 0 }));
      });
    });
    this.server.on('upgrade', (req, socket) => {
      if (!req.url?.startsWith('/gateway')) {
        socket.destroy();
        return;
      }
      const ws = acceptWebSocket(req, socket);
      if (ws) this.onGatewayConnection(ws);
    });
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.port = (this.server.address() as AddressInfo).port;
  }

  private async onRequest(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    const raw = await readBody(req);
    if (url.pathname.startsWith('/attachments/')) {
      const attachment = this.findAttachment(url.pathname.split('/')[3]);
      if (!attachment) return send(res, 404, { message: 'Not found', code: 0 });
      this.attachmentDownloads.push(attachment.id);
      res.writeHead(200, { 'content-type': attachment.contentType });
      res.end(attachment.data);
      return;
    }
    const path = url.pathname
      .replace(/^\/api\/v\d+/, '')
      .split('/')
      .map((segment) => decodeURIComponent(segment))
      .join('/');
    const method = req.method ?? 'GET';
    const { body, files } = await parseBody(req.headers['content-type'], raw);
    const record: RecordedRequest = {
      method,
      path,
      query: url.searchParams,
      body,
      files,
      status: 0,
      at: Date.now(),
      auth: req.headers.authorization,
    };
    this.requests.push(record);
    const reply = (status: number, json?: unknown, headers: Record<string, string> = {}): void => {
      record.status = status;
      send(res, status, json, headers);
    };

    const failure = this.failures.find((f) => (f.method === undefined || f.method === method) && f.path.test(path));
    if (failure) {
      if (failure.times !== undefined && --failure.times <= 0) this.failures.splice(this.failures.indexOf(failure), 1);
      if (failure.status === 429) {
        const retryAfter = failure.retryAfter ?? 0.05;
        return reply(
          429,
          { message: 'You are being rate limited.', retry_after: retryAfter, global: failure.global ?? false },
          {
            'retry-after': String(retryAfter),
            'x-ratelimit-scope': failure.global ? 'global' : 'user',
            ...(failure.global ? { 'x-ratelimit-global': 'true' } : {}),
          },
        );
      }
      return reply(failure.status, { message: failure.message ?? 'Internal Server Error', code: failure.code ?? 0 });
    }

    const needsBotAuth = !path.startsWith('/webhooks/') && !path.startsWith('/interactions/');
    if (needsBotAuth && req.headers.authorization !== `Bot ${this.token}`) {
      return reply(401, { message: '401: Unauthorized', code: 0 });
    }
    const result = this.route(method, path, url.searchParams, body ?? {}, files);
    if (!result) return reply(404, { message: '404: Not Found', code: 0 });
    return reply(result.status, result.json);
  }

  private route(
    method: string,
    path: string,
    query: URLSearchParams,
    body: Record<string, unknown>,
    files: RecordedRequest['files'],
  ): { status: number; json?: unknown } | undefined {
    const parts = path.split('/').filter(Boolean);
    const is = (m: string, pattern: string): boolean => {
      if (m !== method) return false;
      const want = pattern.split('/').filter(Boolean);
      return want.length === parts.length && want.every((w, i) => w.startsWith(':') || w === parts[i]);
    };

    if (is('GET', '/gateway/bot')) {
      return {
        status: 200,
        json: {
          url: this.gatewayUrl,
          shards: 1,
          session_start_limit: { total: 1000, remaining: 999, reset_after: 0, max_concurrency: 1 },
        },
      };
    }
    if (is('GET', '/gateway')) return { status: 200, json: { url: this.gatewayUrl } };
    if (is('GET', '/users/@me')) return { status: 200, json: this.userJson(this.botUser) };
    if (is('GET', '/users/:id')) {
      const user = this.users.get(parts[1]);
      return user ? { status: 200, json: this.userJson(user) } : unknown(10013, 'Unknown User');
    }
    if (is('GET', '/applications/@me')) {
      return { status: 200, json: { id: this.applicationId, name: 'ensemble-bot', flags: 0, bot_public: true } };
    }
    if (is('PUT', '/applications/:app/commands') || is('PUT', '/applications/:app/guilds/:guild/commands')) {
      const scope = parts.length === 3 ? 'global' : parts[3];
      const list = (body as unknown as Record<string, unknown>[]).map((c) => ({
        ...c,
        id: snowflake(),
        application_id: this.applicationId,
        version: snowflake(),
        ...(scope === 'global' ? {} : { guild_id: scope }),
      }));
      this.deployedCommands.set(scope, list);
      return { status: 200, json: list };
    }
    if (is('POST', '/interactions/:id/:token/callback')) return this.interactionCallback(parts[1], parts[2], query, body, files);
    if (parts[0] === 'webhooks' && parts.length >= 3) return this.webhookRoute(method, parts, body, files);
    if (is('GET', '/channels/:channel')) {
      return this.channelIds.includes(parts[1])
        ? { status: 200, json: this.channelJson(parts[1]) }
        : unknown(10003, 'Unknown Channel');
    }
    if (is('POST', '/channels/:channel/messages')) {
      if (!this.channelIds.includes(parts[1])) return unknown(10003, 'Unknown Channel');
      const message = this.createMessage(parts[1], this.botUser.id, body, files);
      return { status: 200, json: this.messageJson(message) };
    }
    if (parts[0] === 'channels' && parts[2] === 'messages' && parts.length >= 4) {
      const message = this.messages.get(parts[3]);
      if (!message || message.deleted || message.channelId !== parts[1]) return unknown(10008, 'Unknown Message');
      if (is('GET', '/channels/:c/messages/:m')) return { status: 200, json: this.messageJson(message) };
      if (is('PATCH', '/channels/:c/messages/:m')) {
        if (message.authorId !== this.botUser.id) return { status: 403, json: { message: 'Cannot edit a message authored by another user', code: 50005 } };
        this.editMessage(message, body, files);
        return { status: 200, json: this.messageJson(message) };
      }
      if (is('DELETE', '/channels/:c/messages/:m')) {
        message.deleted = true;
        this.dispatch('MESSAGE_DELETE', { id: message.id, channel_id: message.channelId, guild_id: this.guildId });
        return { status: 204 };
      }
      if (is('PUT', '/channels/:c/messages/:m/reactions/:emoji/@me')) {
        this.addReaction(message, parts[5], this.botUser.id);
        return { status: 204 };
      }
      if (is('DELETE', '/channels/:c/messages/:m/reactions/:emoji/:user')) {
        const userId = parts[6] === '@me' ? this.botUser.id : parts[6];
        message.reactions.get(parts[5])?.delete(userId);
        return { status: 204 };
      }
    }
    return undefined;
  }

  private interactionCallback(
    id: string,
    token: string,
    query: URLSearchParams,
    body: Record<string, unknown>,
    files: RecordedRequest['files'],
  ): { status: number; json?: unknown } {
    const interaction = this.interactions.get(id);
    if (!interaction || interaction.token !== token) return unknown(10062, 'Unknown interaction');
    if (interaction.acknowledged) {
      return { status: 400, json: { message: 'Interaction has already been acknowledged.', code: 40060 } };
    }
    const now = Date.now();
    if (this.ackWindowMs !== undefined && now - interaction.createdAt > this.ackWindowMs) return unknown(10062, 'Unknown interaction');
    const type = Number(body.type);
    const data = (body.data as Record<string, unknown> | undefined) ?? {};
    interaction.acks.push({ type, at: now, data });
    let message: FakeMessage | undefined;
    if (type === 4 || type === 5) {
      const flags = Number(data.flags ?? 0) | (type === 5 ? LOADING : 0);
      message = this.createMessage(interaction.channelId, this.botUser.id, { ...data, flags }, files, interaction);
      interaction.originalMessageId = message.id;
    } else if (type === 6 || type === 7) {
      interaction.originalMessageId = interaction.sourceMessageId;
      message = interaction.original;
      if (type === 7 && message) this.editMessage(message, data, files);
    }
    if (query.get('with_response') === 'true') {
      return {
        status: 200,
        json: {
          interaction: { id, type: interaction.type, response_message_loading: type === 5, response_message_ephemeral: false },
          resource: { type, ...(message ? { message: this.messageJson(message) } : {}) },
        },
      };
    }
    return { status: 204 };
  }

  private webhookRoute(
    method: string,
    parts: string[],
    body: Record<string, unknown>,
    files: RecordedRequest['files'],
  ): { status: number; json?: unknown } | undefined {
    const [, applicationId, token] = parts;
    const interaction = this.interactionsByToken.get(token);
    if (applicationId !== this.applicationId || !interaction) return unknown(10015, 'Unknown Webhook');
    if (interaction.tokenExpired || Date.now() - interaction.createdAt > this.tokenLifetimeMs) {
      return { status: 401, json: { message: 'Invalid Webhook Token', code: 50027 } };
    }
    if (parts.length === 3 && method === 'POST') {
      if (!interaction.acknowledged) return unknown(10015, 'Unknown Webhook');
      const message = this.createMessage(interaction.channelId, this.botUser.id, body, files, interaction, true);
      interaction.followupIds.push(message.id);
      return { status: 200, json: this.messageJson(message) };
    }
    if (parts[3] !== 'messages' || parts.length !== 5) return undefined;
    const messageId = parts[4] === '@original' ? interaction.originalMessageId : parts[4];
    const message = messageId ? this.messages.get(messageId) : undefined;
    if (!message || message.deleted) return unknown(10008, 'Unknown Message');
    if (method === 'GET') return { status: 200, json: this.messageJson(message) };
    if (method === 'PATCH') {
      this.editMessage(message, body, files);
      if (message.id === interaction.originalMessageId) {
        interaction.edits.push({ at: Date.now(), body, files: files.map((f) => f.name) });
      }
      return { status: 200, json: this.messageJson(message) };
    }
    if (method === 'DELETE') {
      message.deleted = true;
      this.dispatch('MESSAGE_DELETE', { id: message.id, channel_id: message.channelId, guild_id: this.guildId });
      return { status: 204 };
    }
    return undefined;
  }

  // ---- state -----------------------------------------------------------------------------------

  private newInteraction(type: number, user: FakeUser, channelId: string, sourceMessageId?: string): FakeInteraction {
    this.users.set(user.id, user);
    const interaction = new FakeInteraction(
      this,
      snowflake(),
      `itk-${randomBytes(24).toString('base64url')}`,
      type,
      user,
      channelId,
      Date.now(),
      sourceMessageId,
    );
    this.interactions.set(interaction.id, interaction);
    this.interactionsByToken.set(interaction.token, interaction);
    return interaction;
  }

  private commandInteraction(
    type: 2 | 4,
    name: string,
    options: Record<string, OptionValue | undefined>,
    focused: string | undefined,
    by: { user: FakeUser; channelId?: string; permissions?: bigint },
  ): FakeInteraction {
    const [commandName, ...path] = name.split(' ');
    const definition = this.commands.find((c) => c.name === commandName);
    if (!definition) throw new Error(`unknown command /${commandName}; call setCommands first`);
    if (!this.commandIds.has(commandName)) this.commandIds.set(commandName, snowflake());
    const interaction = this.newInteraction(type, by.user, by.channelId ?? this.channelId);
    // The subcommand (group) path: each level wraps the options of the next.
    const levels: CommandOptionDefinition[] = [];
    let scope: CommandOptionDefinition[] | undefined = definition.options;
    for (const part of path) {
      const level = scope?.find((o) => o.name === part && (o.type === 1 || o.type === 2));
      if (!level) throw new Error(`/${commandName} has no subcommand ${part}`);
      levels.push(level);
      scope = level.options;
    }
    const resolved: {
      users: Record<string, unknown>;
      members: Record<string, unknown>;
      roles: Record<string, unknown>;
      attachments: Record<string, unknown>;
    } = {
      users: {},
      members: {},
      roles: {},
      attachments: {},
    };
    let optionJson: Record<string, unknown>[] = Object.entries(options)
      .filter(([, value]) => value !== undefined)
      .map(([optionName, value]) => {
        const option = scope?.find((o) => o.name === optionName);
        if (!option) throw new Error(`/${name} has no option ${optionName}`);
        if (option.type === USER_OPTION) {
          const user = this.users.get(String(value)) ?? { id: String(value), username: `user-${String(value)}` };
          resolved.users[user.id] = this.userJson(user);
          const { user: _user, ...member } = this.memberJson(user, MEMBER_PERMISSIONS);
          resolved.members[user.id] = member;
        } else if (option.type === ROLE_OPTION) {
          const index = this.roles.findIndex((r) => r.id === String(value));
          if (index >= 0) resolved.roles[this.roles[index].id] = this.roleJson(this.roles[index], index + 1);
        } else if (option.type === ATTACHMENT_OPTION) {
          const upload = this.uploads.get(String(value));
          if (!upload) throw new Error(`no attachment ${String(value)}; call attach first`);
          const url = `http://127.0.0.1:${this.port}/attachments/${this.channelId}/${upload.id}/${upload.filename}`;
          resolved.attachments[upload.id] = {
            id: upload.id,
            filename: upload.filename,
            size: upload.size,
            url,
            proxy_url: url,
            content_type: upload.contentType,
            ...(upload.width !== undefined ? { width: upload.width, height: upload.height } : {}),
          };
        }
        return { name: optionName, type: option.type, value, ...(optionName === focused ? { focused: true } : {}) };
      });
    for (const level of [...levels].reverse()) optionJson = [{ name: level.name, type: level.type, options: optionJson }];
    const hasResolved = Object.values(resolved).some((entries) => Object.keys(entries).length > 0);
    this.dispatch('INTERACTION_CREATE', {
      ...this.interactionBase(interaction, by.permissions),
      data: {
        id: this.commandIds.get(commandName),
        name: commandName,
        type: 1,
        options: optionJson,
        guild_id: this.guildId,
        ...(hasResolved ? { resolved } : {}),
      },
    });
    return interaction;
  }

  private interactionBase(interaction: FakeInteraction, permissions = MEMBER_PERMISSIONS): Record<string, unknown> {
    return {
      id: interaction.id,
      application_id: this.applicationId,
      type: interaction.type,
      token: interaction.token,
      version: 1,
      guild_id: this.guildId,
      channel_id: interaction.channelId,
      channel: this.channelJson(interaction.channelId),
      member: this.memberJson(interaction.user, permissions),
      app_permissions: String(MEMBER_PERMISSIONS | PERMISSIONS.manageMessages),
      locale: 'en-US',
      guild_locale: 'en-US',
      entitlements: [],
      authorizing_integration_owners: { '0': this.guildId },
      context: 0,
      attachment_size_limit: 10 * 1024 * 1024,
    };
  }

  private createMessage(
    channelId: string,
    authorId: string,
    body: Record<string, unknown>,
    files: RecordedRequest['files'],
    interaction?: FakeInteraction,
    followup = false,
  ): FakeMessage {
    const reference = body.message_reference as { message_id?: string } | undefined;
    const message: FakeMessage = {
      id: snowflake(),
      channelId,
      authorId,
      webhookId: interaction ? this.applicationId : undefined,
      interactionId: interaction && !followup ? interaction.id : undefined,
      content: '',
      embeds: [],
      components: [],
      attachments: [],
      flags: Number(body.flags ?? 0),
      replyTo: reference?.message_id,
      createdAt: Date.now(),
      deleted: false,
      reactions: new Map(),
      history: [],
    };
    this.messages.set(message.id, message);
    this.editMessage(message, body, files, false);
    return message;
  }

  private editMessage(message: FakeMessage, body: Record<string, unknown>, files: RecordedRequest['files'], edited = true): void {
    if (body.content !== undefined) message.content = String(body.content ?? '');
    if (body.embeds !== undefined) message.embeds = (body.embeds as Record<string, unknown>[] | null) ?? [];
    if (body.components !== undefined) message.components = (body.components as Record<string, unknown>[] | null) ?? [];
    if (edited && body.flags !== undefined) message.flags = (message.flags & EPHEMERAL) | Number(body.flags);
    if (edited) message.flags &= ~LOADING;
    const uploaded = new Map(
      files.map((f) => {
        const index = /^files\[(\d+)\]$/.exec(f.field)?.[1] ?? f.field;
        return [index, f] as const;
      }),
    );
    if (Array.isArray(body.attachments)) {
      const next: FakeAttachment[] = [];
      for (const entry of body.attachments as { id: string | number; filename?: string }[]) {
        const existing = message.attachments.find((a) => a.id === String(entry.id));
        if (existing) {
          next.push(existing);
          continue;
        }
        const file = uploaded.get(String(entry.id));
        if (file) next.push({ id: snowflake(), filename: entry.filename ?? file.name, contentType: file.contentType, data: file.data });
      }
      message.attachments = next;
    } else if (files.length > 0) {
      message.attachments = [
        ...message.attachments,
        ...files.map((f) => ({ id: snowflake(), filename: f.name, contentType: f.contentType, data: f.data })),
      ];
    }
    if (edited) message.editedAt = Date.now();
    message.history.push({
      at: Date.now(),
      content: message.content,
      embeds: message.embeds,
      attachments: message.attachments.map((a) => a.filename),
    });
  }

  private addReaction(message: FakeMessage, emoji: string, userId: string): void {
    const users = message.reactions.get(emoji) ?? new Set<string>();
    message.reactions.set(emoji, users);
    if (users.has(userId)) return;
    users.add(userId);
    const user = this.users.get(userId) ?? { id: userId, username: `user-${userId}` };
    this.dispatch('MESSAGE_REACTION_ADD', {
      user_id: userId,
      channel_id: message.channelId,
      message_id: message.id,
      guild_id: this.guildId,
      member: this.memberJson(user, MEMBER_PERMISSIONS),
      emoji: { id: null, name: emoji },
      burst: false,
      burst_colors: [],
      type: 0,
      message_author_id: message.authorId,
    });
  }

  private findAttachment(id: string | undefined): FakeAttachment | undefined {
    const upload = id === undefined ? undefined : this.uploads.get(id);
    if (upload) return upload;
    for (const message of this.messages.values()) {
      const found = message.attachments.find((a) => a.id === id);
      if (found) return found;
    }
    return undefined;
  }

  // ---- JSON shapes -----------------------------------------------------------------------------

  private userJson(user: FakeUser): Record<string, unknown> {
    return {
      id: user.id,
      username: user.username,
      discriminator: '0',
      global_name: user.username,
      avatar: null,
      bot: user.bot ?? false,
      flags: 0,
    };
  }

  private memberJson(user: FakeUser, permissions: bigint): Record<string, unknown> {
    return {
      user: this.userJson(user),
      roles: [...(user.roles ?? [])],
      joined_at: new Date(0).toISOString(),
      deaf: false,
      mute: false,
      flags: 0,
      pending: false,
      permissions: String(permissions),
    };
  }

  /** @everyone has the members' permissions; other roles add none. */
  private roleJson(role: FakeRole, position: number): Record<string, unknown> {
    return {
      id: role.id,
      name: role.name,
      permissions: String(role.id === this.guildId ? MEMBER_PERMISSIONS : 0n),
      position,
      color: 0,
      hoist: false,
      managed: false,
      mentionable: false,
      flags: 0,
    };
  }

  private channelJson(id: string): Record<string, unknown> {
    return {
      id,
      type: 0,
      guild_id: this.guildId,
      name: `channel-${this.channelIds.indexOf(id)}`,
      position: this.channelIds.indexOf(id),
      permission_overwrites: [],
      nsfw: false,
      parent_id: null,
      topic: null,
      last_message_id: null,
      rate_limit_per_user: 0,
      flags: 0,
    };
  }

  private guildJson(): Record<string, unknown> {
    return {
      id: this.guildId,
      name: 'Test Guild',
      icon: null,
      splash: null,
      discovery_splash: null,
      owner_id: snowflake(),
      afk_channel_id: null,
      afk_timeout: 300,
      verification_level: 0,
      default_message_notifications: 0,
      explicit_content_filter: 0,
      roles: [this.roleJson({ id: this.guildId, name: '@everyone' }, 0), ...this.roles.map((role, i) => this.roleJson(role, i + 1))],
      emojis: [],
      stickers: [],
      features: [],
      mfa_level: 0,
      system_channel_id: null,
      system_channel_flags: 0,
      rules_channel_id: null,
      vanity_url_code: null,
      description: null,
      banner: null,
      premium_tier: 0,
      preferred_locale: 'en-US',
      public_updates_channel_id: null,
      nsfw_level: 0,
      premium_progress_bar_enabled: false,
      joined_at: new Date(0).toISOString(),
      large: false,
      unavailable: false,
      member_count: 2,
      voice_states: [],
      members: [this.memberJson(this.botUser, MEMBER_PERMISSIONS | PERMISSIONS.manageMessages)],
      channels: this.channelIds.map((id) => this.channelJson(id)),
      threads: [],
      presences: [],
      stage_instances: [],
      guild_scheduled_events: [],
      soundboard_sounds: [],
    };
  }

  messageJson(message: FakeMessage): Record<string, unknown> {
    const reactions = [...message.reactions.entries()]
      .filter(([, users]) => users.size > 0)
      .map(([emoji, users]) => ({
        emoji: { id: null, name: emoji },
        count: users.size,
        count_details: { burst: 0, normal: users.size },
        me: users.has(this.botUser.id),
        me_burst: false,
        burst_colors: [],
      }));
    return {
      id: message.id,
      channel_id: message.channelId,
      guild_id: this.guildId,
      author: this.userJson(this.users.get(message.authorId) ?? { id: message.authorId, username: 'unknown' }),
      content: message.content,
      timestamp: new Date(message.createdAt).toISOString(),
      edited_timestamp: message.editedAt ? new Date(message.editedAt).toISOString() : null,
      tts: false,
      mention_everyone: false,
      mentions: [],
      mention_roles: [],
      attachments: message.attachments.map((a) => ({
        id: a.id,
        filename: a.filename,
        size: a.data.length,
        url: `http://127.0.0.1:${this.port}/attachments/${message.channelId}/${a.id}/${a.filename}`,
        proxy_url: `http://127.0.0.1:${this.port}/attachments/${message.channelId}/${a.id}/${a.filename}`,
        content_type: a.contentType,
      })),
      embeds: message.embeds,
      reactions,
      pinned: false,
      type: message.replyTo ? 19 : message.interactionId ? 20 : 0,
      flags: message.flags,
      components: message.components,
      ...(message.webhookId ? { webhook_id: message.webhookId, application_id: this.applicationId } : {}),
      ...(message.replyTo
        ? { message_reference: { type: 0, message_id: message.replyTo, channel_id: message.channelId, guild_id: this.guildId } }
        : {}),
    };
  }
}

function unknown(code: number, message: string): { status: number; json: unknown } {
  return { status: 404, json: { message, code } };
}

function send(res: ServerResponse, status: number, json?: unknown, headers: Record<string, string> = {}): void {
  if (json === undefined) {
    res.writeHead(status, headers);
    res.end();
    return;
  }
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(JSON.stringify(json));
}

function readBody(req: IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

async function parseBody(
  contentType: string | undefined,
  raw: Buffer,
): Promise<{ body: Record<string, unknown> | undefined; files: RecordedRequest['files'] }> {
  if (raw.length === 0) return { body: undefined, files: [] };
  if (contentType?.startsWith('multipart/form-data')) {
    const form = await new Response(raw, { headers: { 'content-type': contentType } }).formData();
    let body: Record<string, unknown> | undefined;
    const files: RecordedRequest['files'] = [];
    for (const [field, value] of form.entries()) {
      if (typeof value === 'string') {
        if (field === 'payload_json') body = JSON.parse(value) as Record<string, unknown>;
      } else {
        files.push({ field, name: value.name, contentType: value.type, data: Buffer.from(await value.arrayBuffer()) });
      }
    }
    return { body, files };
  }
  return { body: JSON.parse(raw.toString('utf8')) as Record<string, unknown>, files: [] };
}
