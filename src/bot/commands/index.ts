import type { SlashCommand } from '../context.ts';
import { admin } from './admin.ts';
import { cancel } from './cancel.ts';
import { imagine } from './imagine.ts';
import { models } from './models.ts';
import { queue } from './queue.ts';
import { settings } from './settings.ts';

/** Every slash command, as registered by the deploy script and routed by the bot. */
export const commands: readonly SlashCommand[] = [imagine, models, queue, cancel, settings, admin];
