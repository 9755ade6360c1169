// Routes interactions to command modules and button handlers; nothing thrown here crashes the bot.
// Users blocked in a server (/admin block) are refused here, whatever they use (but /admin for its admins).
import { MessageFlags, type Interaction } from 'discord.js';
import { blockedRefusal, isServerAdmin } from './access.ts';
import { handleButton } from './buttons.ts';
import type { BotContext, SlashCommand } from './context.ts';

export function createInteractionRouter(ctx: BotContext, commands: readonly SlashCommand[]): (interaction: Interaction) => Promise<void> {
  const byName = new Map(commands.map((command) => [command.data.name, command]));
  return async (interaction) => {
    try {
      const blocked = blockedRefusal(ctx, interaction.guildId, interaction.user.id);
      const exempt = interaction.isChatInputCommand() && interaction.commandName === 'admin' && isServerAdmin(interaction.memberPermissions);
      if (blocked && !exempt) {
        if (interaction.isAutocomplete()) await interaction.respond([]);
        else if (interaction.isRepliable()) await interaction.reply({ content: blocked, flags: MessageFlags.Ephemeral });
        return;
      }
      if (interaction.isAutocomplete()) {
        await (byName.get(interaction.commandName)?.autocomplete?.(interaction, ctx) ?? interaction.respond([]));
      } else if (interaction.isChatInputCommand()) {
        const command = byName.get(interaction.commandName);
        if (!command) {
          await interaction.reply({ content: 'I do not know that command any more.', flags: MessageFlags.Ephemeral });
          return;
        }
        await command.execute(interaction, ctx);
      } else if (interaction.isButton()) {
        await handleButton(interaction, ctx);
      }
    } catch (error) {
      ctx.logger.error({ err: error, interaction: interaction.id, type: interaction.type }, 'interaction failed');
      if (!interaction.isRepliable()) return;
      const content = 'Something went wrong on my side; please try again.';
      try {
        if (interaction.deferred || interaction.replied) await interaction.followUp({ content, flags: MessageFlags.Ephemeral });
        else await interaction.reply({ content, flags: MessageFlags.Ephemeral });
      } catch {
        // The interaction may have expired; nothing more to do.
      }
    }
  };
}
