"""Adding an ensemble to an existing package (contract C3):

    python3 -m trainer.export --add-to PKG --method fuse --experts a,b,c [--id ID] [--title T]
                              [--temperature X] [--text] [--force]
    python3 -m trainer.export --add-to PKG --method afa --aggregator RUN_DIR [--experts a,b,c] [--id ID]
                              [--title T] [--subsets] [--force]

The experts' PyTorch weights come from `PKG/sources.json` (packages made by `npm run import`: the
checkpoint or diffusers folder each expert came from) or, for packages the trainer exported, from the
package's own expert graphs (trainer.export.graph_weights). The new graph is exported like every
other (parity-checked against PyTorch in onnxruntime), with the storage (float16 or not), timestep type
and attention mask of the package's expert graphs.

When another ensemble of the package has the same experts in the same order, the new graph goes into
that ensemble's folder as `<id>.onnx` and the graphs of the folder share one external data file in
which every weight is stored once (trainer.export.shared_weights): an AFA graph and a fuse graph over
three experts then cost the U-Nets' bytes once. The rewritten graphs must give the same outputs as
before in onnxruntime.

Nothing partial is written: everything is built in a hidden folder inside the package, then moved into
place, and manifest.json is replaced last (validated with the package's files in place); on any error
the package is left as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import onnx
import torch

from trainer.export.errors import ExportError, ManifestError
from trainer.export.graph_weights import config_beside, unet_config_beside, unet_from_graph
from trainer.export.graphs import export_afa
from trainer.export.large_graph import STREAM_ABOVE, ExpertWeights, export_afa_streamed, fp32_bytes
from trainer.export.manifest import validate_manifest
from trainer.export.onnx_io import graph_io
from trainer.export.package import default_title, ensemble_method
from trainer.export.fp16_compute import add_fp16_variants
from trainer.export.parity import Check, add_graph_arguments, check_from_arguments
from trainer.export.shared_weights import (DATA_NAME, check_unchanged, external_files, read_manifest, replace_folder,
                                           share_weights)
from trainer.io.model_folders import afa_hyperparameters, load_aggregators, load_unet, read_afa_config
from trainer.models.afa import AFAEnsemble
from trainer.models.fusion import DEFAULT_TEMPERATURE, FusionEnsemble
from trainer.models.unet import UNet2DConditionModel

SOURCES = "sources.json"


# ---------------------------------------------------------------------------------------------
# the package as it is




def graph_ref(ref: Any) -> str:
    """A manifest graph reference (a path, or {"fp32": path, "fp16": path}) → the float32 graph's path."""
    if isinstance(ref, str):
        return ref
    if isinstance(ref, Mapping) and ref:
        return ref.get("fp32") or ref["fp16"]
    raise ExportError(f"not a graph reference: {ref!r}")


def expert_graph(manifest: Mapping[str, Any], expert_id: str) -> str:
    entry = next(e for e in manifest["experts"] if e["id"] == expert_id)
    if entry.get("unet"):
        return graph_ref(entry["unet"])
    return os.path.join(entry["path"], "unet", "model.onnx")


def load_expert_unets(package_dir: str, manifest: Mapping[str, Any], ids: Sequence[str], *, check: Check = "auto",
                      log=print) -> List[UNet2DConditionModel]:
    """The experts' U-Nets in float32: from sources.json when it lists the expert (its checkpoint or
    diffusers folder; a single file gets the config.json beside the expert's graph), else rebuilt from
    the package's expert graph."""
    sources: Dict[str, Any] = {}
    path = os.path.join(package_dir, SOURCES)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            sources = json.load(f).get("experts", {})
    known = {e["id"] for e in manifest["experts"]}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ExportError(f"{package_dir} has no expert {', '.join(map(repr, unknown))} "
                          f"(it has {', '.join(sorted(known))})")
    unets = []
    for expert_id in ids:
        graph = os.path.join(package_dir, expert_graph(manifest, expert_id))
        source = sources.get(expert_id)
        if source:
            weights = source["path"]
            if not os.path.exists(weights):
                raise ExportError(f"expert {expert_id!r}: {SOURCES} names {weights}, which is missing")
            config_path = config_beside(graph)
            config = None
            if config_path is not None:
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            if log:
                log(f"expert {expert_id}: weights from {weights}")
            unets.append(load_unet(weights, config).float().eval())
        else:
            if log:
                log(f"expert {expert_id}: weights read back from {os.path.relpath(graph, package_dir)}")
            unets.append(unet_from_graph(graph, check=check))
    return unets


def streamed_experts(package_dir: str, manifest: Mapping[str, Any], ids: Sequence[str], *,
                     stream_above: Optional[int] = None, check: Check = "auto",
                     log=print) -> Optional[Tuple[List[UNet2DConditionModel], ExpertWeights]]:
    """For experts too large to hold all at once (SD1.5: 3.4 GB of float32 each): U-Nets on the meta
    device and a callable giving expert i's weights when the export writes them (one expert in memory at
    a time). None when the experts are small enough to load (or their configs are not in the package)."""
    if not set(ids) <= {e["id"] for e in manifest["experts"]}:
        return None  # load_expert_unets names the unknown ones
    configs = [unet_config_beside(os.path.join(package_dir, expert_graph(manifest, i))) for i in ids]
    if any(c is None for c in configs):
        return None
    skeletons = [UNet2DConditionModel(c, device="meta") for c in configs]
    limit = STREAM_ABOVE if stream_above is None else stream_above
    if max(fp32_bytes(u) for u in skeletons) <= limit:
        return None

    def weights(i: int) -> Mapping[str, torch.Tensor]:
        return load_expert_unets(package_dir, manifest, [ids[i]], check=check, log=log)[0].state_dict()

    return skeletons, weights


def _graph_options(path: str) -> Dict[str, Any]:
    """fp16 storage, timestep type and attention mask of an expert graph, for the new graph to match."""
    model = onnx.load(path, load_external_data=False)
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    inputs, _ = graph_io(path)
    int64 = inputs["timestep"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    return {"fp16": fp16, "timestep_dtype": "int64" if int64 else "float32",
            "attention_mask": "encoder_attention_mask" in inputs}


# ---------------------------------------------------------------------------------------------
# adding one ensemble


def add_ensemble(package_dir: str, ens_id: str, ensemble: AFAEnsemble, experts: Sequence[str], *,
                 subsets: bool = True, title: Optional[str] = None, description: str = "", force: bool = False,
                 fp16: Optional[bool] = None, check: Check = "auto", share: bool = True,
                 expert_weights: Optional[ExpertWeights] = None, log=print) -> Dict[str, Any]:
    """Exports `ensemble` (AFAEnsemble or FusionEnsemble over `experts`, in the order of its U-Nets) into the
    package and adds its manifest entry; returns the entry. fp16 None: as the package's expert graphs.
    expert_weights: the ensemble's U-Nets are on the meta device and expert_weights(i) gives expert i's
    weights (streamed_experts): the graph is written tensor by tensor, without a parity run."""
    manifest = read_manifest(package_dir)
    experts = list(experts)
    expert_ids = [e["id"] for e in manifest["experts"]]
    ensembles = list(manifest.get("ensembles", []))
    if ens_id in expert_ids:
        raise ExportError(f"{ens_id!r} is an expert of {package_dir}; choose another --id")
    existing = next((e for e in ensembles if e["id"] == ens_id), None)
    if existing is not None and not force:
        raise ExportError(f"{package_dir} already has an ensemble {ens_id!r}; choose another --id or pass --force "
                          f"to replace it")
    missing = [e for e in experts if e not in expert_ids]
    if missing:
        raise ExportError(f"{package_dir} has no expert {', '.join(map(repr, missing))}")
    if len(experts) != ensemble.num_experts:
        raise ExportError(f"the ensemble has {ensemble.num_experts} U-Nets but {len(experts)} experts are named")
    method = ensemble_method(ensemble)
    options = _graph_options(os.path.join(package_dir, expert_graph(manifest, experts[0])))
    options["compact"] = True  # short value names: the graph's structure is several MB with the exporter's
    if fp16 is not None:
        options["fp16"] = fp16

    others = [e for e in ensembles if e["id"] != ens_id]
    partner = next((e for e in others if share and list(e["experts"]) == experts and isinstance(e["graph"], str)),
                   None)
    # the experts' graphs may already share one weights file in one folder (unets/, trainer.export.shared_weights)
    expert_folders = {os.path.dirname(expert_graph(manifest, e)) for e in experts}
    shared_folder = next(iter(expert_folders)) if len(expert_folders) == 1 else None
    if partner is not None:
        folder = os.path.dirname(partner["graph"])
        file = f"{ens_id}.onnx"
    elif share and shared_folder and os.path.isfile(os.path.join(package_dir, shared_folder, DATA_NAME)):
        folder, file = shared_folder, f"{ens_id}.onnx"
    else:
        folder, file = f"ensembles/{ens_id}", "model.onnx"
    # every graph of the folder (ensembles', and experts' U-Nets) is rewritten to read the new data file
    group = [e["graph"] for e in others if isinstance(e["graph"], str) and os.path.dirname(e["graph"]) == folder]
    group += [e["unet"] for e in manifest["experts"]
              if isinstance(e.get("unet"), str) and os.path.dirname(e["unet"]) == folder]

    work = tempfile.mkdtemp(prefix=f".add-{ens_id}-", dir=package_dir)
    target = os.path.join(package_dir, folder)
    try:
        built = os.path.join(work, "built", file)
        os.makedirs(os.path.dirname(built))
        if expert_weights is not None:
            del options["compact"]
            report = export_afa_streamed(ensemble.eval(), built, expert_weights, subsets=subsets, check=check,
                                         name=f"{method} {ens_id}", **options)
        else:
            report = export_afa(ensemble.eval(), built, subsets=subsets, check=check, name=f"{method} {ens_id}",
                                **options)
        if log:
            log(report.summary())
        stage = os.path.join(work, "stage")
        os.makedirs(stage)
        if group:
            sources = [os.path.join(package_dir, g) for g in group] + [built]
            names = [os.path.basename(g) for g in group] + [file]
            stats = share_weights(sources, [os.path.join(stage, n) for n in names])
            if log:
                log(f"{folder}: {', '.join(names)} share {DATA_NAME} ({stats['unique']} distinct of "
                    f"{stats['tensors']} tensors, {stats['bytes'] / 1e6:.2f} MB)")
            check_unchanged([(os.path.join(package_dir, g), os.path.join(stage, os.path.basename(g))) for g in group],
                            check)
            keep = set(names) | {DATA_NAME}
            stale = set()
            for g in group:
                stale.update(external_files(os.path.join(package_dir, g)))
        else:
            data = external_files(built)  # a streamed export's weights (<file>_data)
            for name in [file] + data:
                shutil.move(os.path.join(os.path.dirname(built), name), os.path.join(stage, name))
            keep, stale = {file, *data}, set()
        if os.path.isdir(target):
            for name in os.listdir(target):  # files of the folder the graphs do not replace (not ours)
                if name not in keep and name not in stale and not (existing and os.path.join(folder, name) ==
                                                                   graph_ref(existing["graph"])):
                    shutil.copy2(os.path.join(target, name), os.path.join(stage, name))

        entry = {"id": ens_id, "title": title or default_title(ens_id, method), "description": description,
                 "method": method, "experts": experts, "graph": f"{folder}/{file}", "subsets": bool(subsets)}
        new_manifest = dict(manifest)
        new_manifest["ensembles"] = [entry if e["id"] == ens_id else e for e in ensembles] + \
            ([] if existing is not None else [entry])
        validate_manifest(new_manifest)  # the schema's rules, before anything moves

        replace_folder(package_dir, stage, target, work, new_manifest)
        if existing is not None and os.path.dirname(graph_ref(existing["graph"])) != folder:
            _remove_unused(package_dir, new_manifest, graph_ref(existing["graph"]))
        if log:
            log(f"added ensemble {ens_id!r} ({method}, {' + '.join(experts)}) as {folder}/{file}")
        return entry
    finally:
        shutil.rmtree(work, ignore_errors=True)




def _remove_unused(package_dir: str, manifest: Mapping[str, Any], old_graph: str) -> None:
    """Deletes a replaced ensemble's old folder when no graph of the manifest lies in it any more."""
    folder = os.path.dirname(old_graph)
    used = {os.path.dirname(graph_ref(e["graph"])) for e in manifest.get("ensembles", [])}
    if folder.startswith("ensembles/") and folder not in used:
        shutil.rmtree(os.path.join(package_dir, folder), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the two methods


def add_fuse(package_dir: str, experts: Sequence[str], *, ens_id: Optional[str] = None, title: Optional[str] = None,
             description: Optional[str] = None, temperature: float = DEFAULT_TEMPERATURE, text: bool = False,
             subsets: bool = True, force: bool = False, fp16: Optional[bool] = None, check: Check = "auto",
             share: bool = True, log=print) -> Dict[str, Any]:
    """A training-free fused ensemble (trainer.models.fusion) over the package's `experts`."""
    manifest = read_manifest(package_dir)
    experts = list(experts)
    if len(experts) < 2 or len(set(experts)) != len(experts):
        raise ExportError(f"--experts needs at least 2 distinct expert ids, got {','.join(experts)}")
    unets, weights = _unets(package_dir, manifest, experts, check, log)
    ensemble = FusionEnsemble(unets, temperature=temperature, text=text)
    if description is None:
        description = (f"{', '.join(experts)} fused per pixel by their feature variance, without training "
                       f"(temperature {temperature:g}{', text-weighted' if text else ''})")
    return add_ensemble(package_dir, ens_id or "fuse-" + "-".join(experts), ensemble, experts, subsets=subsets,
                        title=title, description=description, force=force, fp16=fp16, check=check, share=share,
                        expert_weights=weights, log=log)


def _unets(package_dir: str, manifest: Mapping[str, Any], ids: Sequence[str], check: Check, log):
    """(U-Nets, expert_weights or None): loaded, or on the meta device when they are too large (streamed_experts)."""
    streamed = streamed_experts(package_dir, manifest, ids, check=check, log=log)
    if streamed is not None:
        if log:
            log(f"experts {', '.join(ids)}: too large to hold together; each expert's weights are read when the "
                f"graph's are written")
        return streamed
    return load_expert_unets(package_dir, manifest, ids, check=check, log=log), None


def _afa_folder(run_dir: str) -> str:
    for candidate in (run_dir, os.path.join(run_dir, "final")):
        if os.path.isfile(os.path.join(candidate, "afa", "config.json")) or \
                os.path.isfile(os.path.join(candidate, "config.json")) and \
                os.path.isfile(os.path.join(candidate, "aggregators.safetensors")):
            return candidate
    raise ExportError(f"{run_dir} holds no trained aggregators (afa/config.json and afa/aggregators.safetensors, "
                      f"as `python3 -m trainer.train` writes under final/)")


def add_afa(package_dir: str, run_dir: str, *, experts: Optional[Sequence[str]] = None, ens_id: Optional[str] = None,
            title: Optional[str] = None, description: str = "", subsets: bool = False, force: bool = False,
            fp16: Optional[bool] = None, check: Check = "auto", share: bool = True, log=print) -> Dict[str, Any]:
    """An AFA ensemble from aggregators trained by `python3 -m trainer.train` (RUN_DIR or RUN_DIR/final)."""
    folder = _afa_folder(run_dir)
    config = read_afa_config(folder)
    ids = list(experts) if experts else list(config.get("expert_ids") or [])
    if not ids:
        raise ExportError(f"{run_dir} does not record its experts' ids (expert_ids): pass --experts a,b,c in the "
                          f"order the aggregator was trained with")
    if len(ids) != config.get("num_experts", len(ids)):
        raise ExportError(f"the aggregator was trained on {config['num_experts']} experts, {len(ids)} are named")
    manifest = read_manifest(package_dir)
    unets, weights = _unets(package_dir, manifest, ids, check, log)
    ensemble = AFAEnsemble(unets, **{k: config[k] for k in ("hidden", "depth", "heads", "head_dim") if k in config},
                           device="cpu")
    assert afa_hyperparameters(ensemble)["num_experts"] == len(ids)
    load_aggregators(ensemble, folder)
    return add_ensemble(package_dir, ens_id or "afa-" + "-".join(ids), ensemble.eval(), ids, subsets=subsets,
                        title=title, description=description, force=force, fp16=fp16, check=check, share=share,
                        expert_weights=weights, log=log)


# ---------------------------------------------------------------------------------------------
# the command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m trainer.export --add-to",
                                description="Add an ensemble (training-free fuse, or a trained AFA aggregator) to a "
                                            "model package.")
    p.add_argument("--add-to", required=True, metavar="PKG", help="the package folder (manifest.json)")
    p.add_argument("--method", required=True, choices=("fuse", "afa"))
    p.add_argument("--experts", help="expert ids, comma-separated, in the ensemble's order (fuse: required)")
    p.add_argument("--aggregator", metavar="RUN_DIR", help="afa: the training run (its final/afa/)")
    p.add_argument("--id", help="the ensemble's id (default: fuse-a-b-c / afa-a-b-c)")
    p.add_argument("--title", help="shown to users (default: the id and the method)")
    p.add_argument("--description", help="what the ensemble is")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"fuse: softmax temperature of the variance rule (default {DEFAULT_TEMPERATURE:g})")
    p.add_argument("--text", action="store_true", help="fuse: also weigh each expert by its attention to the prompt")
    p.add_argument("--subsets", action=argparse.BooleanOptionalAction, default=None,
                   help="the graph takes expert_mask (any subset of the experts; default: fuse yes, afa no)")
    p.add_argument("--force", action="store_true", help="replace an ensemble with the same id")
    p.add_argument("--no-share", action="store_true",
                   help="do not share weights with another ensemble over the same experts")
    add_graph_arguments(p, "the new graph")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check = check_from_arguments(args)
    fp16 = True if args.fp16 else None
    experts = [e.strip() for e in args.experts.split(",") if e.strip()] if args.experts else None
    try:
        with torch.no_grad():
            if args.method == "fuse":
                if not experts:
                    raise ExportError("--method fuse needs --experts a,b[,c] (ids of the package's experts)")
                if not args.temperature > 0:
                    raise ExportError(f"--temperature must be > 0, got {args.temperature:g}")
                if args.aggregator:
                    raise ExportError("--aggregator is for --method afa; fuse trains nothing")
                entry = add_fuse(args.add_to, experts, ens_id=args.id, title=args.title,
                                 description=args.description, temperature=args.temperature, text=args.text,
                                 subsets=True if args.subsets is None else args.subsets, force=args.force, fp16=fp16,
                                 check=check, share=not args.no_share)
            else:
                if not args.aggregator:
                    raise ExportError("--method afa needs --aggregator RUN_DIR (a `python3 -m trainer.train` run)")
                entry = add_afa(args.add_to, args.aggregator, experts=experts, ens_id=args.id, title=args.title,
                                description=args.description or "", subsets=bool(args.subsets), force=args.force,
                                fp16=fp16, check=check, share=not args.no_share)
        if args.cuda_fp16:
            add_fp16_variants(args.add_to, ("ensembles",), paths={entry["graph"]}, force=True)
    except (ExportError, ManifestError, OSError, ValueError) as e:
        print(f"add-to failed: {e}", file=sys.stderr)
        return 1
    print(f"{os.path.join(args.add_to, 'manifest.json')}: ensemble {entry['id']!r} ({entry['method']}) → "
          f"{entry['graph']}")
    return 0
