"""`python3 -m trainer.build_demo`: the demo zoo build (trainer.demo.build)."""
import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

from trainer.demo.build import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
