# Sourced by the test scripts: PY is the Python that runs the trainer, PYTHON if set, else Debian's
# /usr/bin/python3. Never a bare `python3`: a pyenv or venv python3 earlier on PATH has no torch.
PY="${PYTHON:-/usr/bin/python3}"
PY_MODULES="torch, onnx, numpy, pytest, jsonschema"
