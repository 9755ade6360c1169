"""Where the trainer's tests find the repository's golden data (test/fixtures/golden, see its README)."""
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "test" / "fixtures" / "golden"
CLIP_DIR = GOLDEN_DIR / "clip"
SCHEDULER_GOLDEN = GOLDEN_DIR / "scheduler_golden.json"
SD15_UNET_KEYS = GOLDEN_DIR / "sd15_unet_diffusers_keys.json"
