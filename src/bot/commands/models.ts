import { EmbedBuilder, MessageFlags, InteractionContextType, SlashCommandBuilder, type ChatInputCommandInteraction } from 'discord.js';
import type { PackageInfo } from '../../engine/api.ts';
import { MODE_LABELS } from '../../engine/labels.ts';
import { clip, expertTitle } from '../messages.ts';
import type { BotContext, SlashCommand } from '../context.ts';

const data = new SlashCommandBuilder()
  .setName('models')
  // Server channels only: results, reactions and fallbacks are channel messages.
  .setContexts(InteractionContextType.Guild)
  .setDescription('The models and ensembles I can draw with');

export function modelsEmbed(info: PackageInfo): EmbedBuilder {
  const ensembles = info.ensembles.map(
    (e) => `**${e.title}** \`${e.id}\` — ${MODE_LABELS[e.method].name} of ${e.experts.map((id) => expertTitle(info, id)).join(', ')}${e.description ? `: ${e.description}` : ''}`,
  );
  const experts = info.experts.map((e) => `**${e.title}** \`${e.id}\` — ${e.description}`);
  const example = info.experts.slice(0, 2).map((e) => e.id).join('+');
  const d = info.defaults;
  return new EmbedBuilder()
    .setColor(0x5865f2)
    .setTitle(clip(`${info.name} ${info.version}`, 256))
    .setDescription(clip(info.description || 'Diffusion models, alone or together.', 4000))
    .addFields(
      { name: 'Ensembles (mode afa or fuse)', value: clip(ensembles.join('\n') || 'none yet', 1024) },
      { name: 'Experts (mode single)', value: clip(experts.join('\n') || 'none', 1024) },
      {
        name: 'Combining',
        value: clip(
          `Type experts joined by + in \`model\` (e.g. \`${example}\`) and pick mode average or merge; ` +
            'afa needs a trained ensemble of those experts, fuse a training-free fuse ensemble of them. `contributions:true` or 🧩 shows which model drew what.',
          1024,
        ),
      },
      { name: 'Defaults', value: `${d.steps} steps · guidance ${d.guidance} · ${d.scheduler} · ${d.width}×${d.height}` },
    );
}

async function execute(interaction: ChatInputCommandInteraction, ctx: BotContext): Promise<void> {
  await interaction.reply({ embeds: [modelsEmbed(ctx.info)], flags: MessageFlags.Ephemeral });
}

export const models: SlashCommand = { data, execute };
