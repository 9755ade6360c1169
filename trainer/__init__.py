"""The Python side of the bot: trains the diffusion models, exports them as ONNX model packages, and
builds the demo zoo.

Sub-packages, lowest layer first (a package imports only from layers below it; trainer/tests/test_layering.py
checks this):
    models, text          the networks; the CLIP BPE tokenizer
    diffusion, io         schedules, losses, the reference sampler; weight files, model folders, checkpoints
    training              options, objectives, the loop, data, config files, the train CLI
    export                ONNX graphs, fp16 storage, parity checks, manifests, packages
    fixture, demo         the engine's tiny test package; the shapes-world demo zoo and its build
The modules directly in trainer/ only keep `python3 -m trainer.<name>` commands working.
"""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
