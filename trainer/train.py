"""`python3 -m trainer.train`: the trainer's command line (trainer.training.cli)."""
import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

from trainer.training.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
