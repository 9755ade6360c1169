"""Files: safetensors and PNG without extra packages, SD checkpoints in diffusers and original (LDM)
layouts, the model folders a run leaves behind, and training checkpoints."""
