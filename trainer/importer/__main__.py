import sys

try:
    from trainer.importer.cli import main
except ModuleNotFoundError as e:  # torch or onnx missing: one line, not a traceback
    print(f"import failed: {sys.executable} cannot import {e.name} (bash scripts/prerequisites.sh installs "
          f"Debian's python3-torch python3-onnx; or set PYTHON)", file=sys.stderr)
    raise SystemExit(1)

if __name__ == "__main__":
    raise SystemExit(main())
