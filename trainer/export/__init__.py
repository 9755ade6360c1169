"""ONNX export of trained modules into a model package (docs/model-package.md) and its manifest.

    errors           ExportError, ExportDriftError, ManifestError
    onnx_io          torch.onnx.export across torch versions; reading and writing graph files
    fp16             float16 weight storage, parity rounding, short value names
    ort_check        runs graphs in onnxruntime-node (scripts/ort-run.mjs)
    parity           PyTorch against onnxruntime on the same feeds
    graphs           the graph kinds: text encoder, VAE decoder and encoder, U-Net, fused AFA ensemble
    manifest_schema  a manifest against docs/manifest.schema.json and the rules across its fields
    manifest         manifest.json: validation (the schema's rules, then the package's files) and writing
    package          whole packages (save_package)
    shared_weights   graphs in one folder reading one external data file, each weight once
    graph_weights    PyTorch U-Nets read back from a package's expert graphs
    add_to           adding a fuse or AFA ensemble to an existing package (--add-to)
    spec             packages from trained model folders named in a JSON spec; the CLI

`python3 -m trainer.export --spec package-spec.json --out models/<name>` runs spec.main. The names
below are the package's API, so that `from trainer.export import save_package` works.
"""
from trainer.export.errors import ExportDriftError, ExportError, ManifestError
from trainer.export.fp16 import compact_names, round_weights_fp16, store_weights_fp16
from trainer.export.graphs import (AFAGraph, GraphReport, UNetGraph, export_afa, export_text_encoder, export_unet,
                                   export_vae_decoder, export_vae_encoder)
from trainer.export.manifest import validate_manifest, write_manifest
from trainer.export.package import EnsembleSpec, PackageResult, architecture_tag, save_package
from trainer.export.parity import check_parity
from trainer.export.spec import package_from_spec

__all__ = [
    "AFAGraph", "EnsembleSpec", "ExportDriftError", "ExportError", "GraphReport", "ManifestError", "PackageResult",
    "UNetGraph", "architecture_tag", "check_parity", "compact_names", "export_afa", "export_text_encoder",
    "export_unet", "export_vae_decoder", "export_vae_encoder", "package_from_spec", "round_weights_fp16",
    "save_package", "store_weights_fp16", "validate_manifest", "write_manifest",
]
