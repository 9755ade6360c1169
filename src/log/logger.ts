// The one logger of the bot, the GPU workers and the tools: structured (pino) and scrubbed of secrets.
import pino, { type DestinationStream, type Logger } from 'pino';

export type { Logger };

/**
 * A pino logger that never prints secrets: known secret values (the bot's Discord token, a GPU
 * worker's Redis password) are replaced in every message and string field, and fields named like
 * tokens are redacted. discord.js's own debug lines include the token ("Provided token: …"), so they
 * must pass through here too.
 */
export function createLogger(
  options: { level: string; secrets?: string[]; destination?: DestinationStream } = { level: 'info' },
): Logger {
  const secrets = (options.secrets ?? []).filter((s) => s.length >= 8);
  const scrub = (text: string): string => secrets.reduce((out, secret) => out.split(secret).join('[secret]'), text);
  const scrubValue = (value: unknown, depth = 0): unknown => {
    if (typeof value === 'string') return scrub(value);
    if (depth > 4 || value === null || typeof value !== 'object') return value;
    if (value instanceof Error) {
      // Not pino's default serializer: discord.js errors carry request URLs that hold interaction tokens.
      const { code, status, method } = value as Error & { code?: unknown; status?: unknown; method?: unknown };
      return { type: value.name, message: scrub(value.message), code, status, method, stack: value.stack ? scrub(value.stack) : undefined };
    }
    if (Array.isArray(value)) return value.map((item) => scrubValue(item, depth + 1));
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, scrubValue(v, depth + 1)]));
  };
  return pino(
    {
      level: options.level,
      redact: {
        paths: ['token', '*.token', 'discordToken', '*.discordToken', 'authorization', '*.authorization', 'headers.authorization'],
        censor: '[secret]',
      },
      hooks: {
        logMethod(args, method) {
          method.apply(this, args.map((arg) => scrubValue(arg)) as Parameters<typeof method>);
        },
      },
    },
    options.destination,
  );
}
