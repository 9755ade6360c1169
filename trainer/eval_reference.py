"""`python3 -m trainer.eval_reference`: the evaluation's reference features (trainer.demo.eval_reference)."""
import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

from trainer.demo.eval_reference import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
