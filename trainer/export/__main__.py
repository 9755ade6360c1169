"""`python3 -m trainer.export`: packages from trained model folders (trainer.export.spec)."""
from trainer.export.spec import main

if __name__ == "__main__":
    raise SystemExit(main())
