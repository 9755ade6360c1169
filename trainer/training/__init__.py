"""Training: options, text conditioning, objectives (VAE, U-Net, AFA aggregators), the shared loop,
the trainers, datasets, progress lines, and runs described by config files."""
