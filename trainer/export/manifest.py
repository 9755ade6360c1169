"""The package manifest (docs/model-package.md): validation with every problem named, and writing it."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, List, Mapping, Optional

from trainer.export.errors import ManifestError
from trainer.export.onnx_io import graph_io

FORMAT = "ensemble-diffusion-package"
FORMAT_VERSION = 1
SCHEDULER_NAMES = ("ddim", "euler", "euler_a", "dpmpp_2m")
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]*$", re.IGNORECASE)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_TOP_KEYS = {"format", "format_version", "name", "version", "description", "latent", "tokenizer", "text_encoder",
             "vae_decoder", "scheduler", "defaults", "size", "limits", "display", "experts", "ensembles"}
_EXPERT_KEYS = {"id", "title", "description", "unet", "path", "text_encoder", "tokenizer", "architecture"}
_ENSEMBLE_KEYS = {"id", "title", "description", "method", "experts", "graph", "subsets"}


def validate_manifest(manifest: Mapping[str, Any], package_dir: Optional[str] = None) -> None:
    """Raises ManifestError listing every way `manifest` breaks docs/model-package.md.

    With package_dir, also checks that every named file exists inside the package and that the
    graphs have the inputs and outputs their role needs.
    """
    problems: List[str] = []
    add = problems.append
    m = manifest
    if not isinstance(m, Mapping):
        raise ManifestError("the manifest must be a JSON object")
    for key in sorted(set(m) - _TOP_KEYS):
        add(f"unknown key {key!r}")
    if m.get("format") != FORMAT:
        add(f"format must be {FORMAT!r}, got {m.get('format')!r}")
    if m.get("format_version") != FORMAT_VERSION or not _is_int(m.get("format_version")):
        add(f"format_version must be {FORMAT_VERSION}, got {m.get('format_version')!r}")
    if not isinstance(m.get("name"), str) or not m.get("name"):
        add("name must be a non-empty string")
    for key in ("version", "description"):
        if key in m and not isinstance(m[key], str):
            add(f"{key} must be a string")

    latent = m.get("latent")
    downsample = None
    if not isinstance(latent, Mapping):
        add("latent must be an object {channels, downsample, scale_factor}")
    else:
        for key in ("channels", "downsample"):
            if not (_is_int(latent.get(key)) and latent[key] > 0):
                add(f"latent.{key} must be a positive integer")
        if not (_is_number(latent.get("scale_factor")) and latent["scale_factor"] > 0):
            add("latent.scale_factor must be a positive number")
        for key in sorted(set(latent) - {"channels", "downsample", "scale_factor"}):
            add(f"unknown key latent.{key}")
        if _is_int(latent.get("downsample")) and latent["downsample"] > 0:
            downsample = latent["downsample"]

    for key in ("tokenizer", "text_encoder", "vae_decoder", "scheduler"):
        if key in m and (not isinstance(m[key], str) or not m[key]):
            add(f"{key} must be a path (string)")

    size = m.get("size")
    if size is not None:
        if not isinstance(size, Mapping) or not all(_is_int(size.get(k)) and size[k] > 0 for k in ("min", "max")):
            add("size must be {min, max} with positive integers")
            size = None
        else:
            if size["min"] > size["max"]:
                add(f"size.min {size['min']} > size.max {size['max']}")
            if downsample:
                for k in ("min", "max"):
                    if size[k] % downsample:
                        add(f"size.{k} {size[k]} is not a multiple of latent.downsample {downsample}")

    defaults = m.get("defaults")
    if not isinstance(defaults, Mapping):
        add("defaults must be an object {steps, guidance, scheduler, width, height}")
    else:
        if not (_is_int(defaults.get("steps")) and 1 <= defaults["steps"] <= 1000):
            add("defaults.steps must be an integer in 1..1000")
        if not (_is_number(defaults.get("guidance")) and 0 <= defaults["guidance"] <= 50):
            add("defaults.guidance must be a number in 0..50")
        if defaults.get("scheduler") not in SCHEDULER_NAMES:
            add(f"defaults.scheduler must be one of {list(SCHEDULER_NAMES)}, got {defaults.get('scheduler')!r}")
        for k in ("width", "height"):
            v = defaults.get(k)
            if not (_is_int(v) and v > 0):
                add(f"defaults.{k} must be a positive integer")
                continue
            if downsample and v % downsample:
                add(f"defaults.{k} {v} is not a multiple of latent.downsample {downsample}")
            if size is not None and not size["min"] <= v <= size["max"]:
                add(f"defaults.{k} {v} is outside size [{size['min']}, {size['max']}]")
        for key in sorted(set(defaults) - {"steps", "guidance", "scheduler", "width", "height"}):
            add(f"unknown key defaults.{key}")

    limits = m.get("limits")
    if limits is not None:
        if not isinstance(limits, Mapping) or set(limits) - {"max_steps", "max_count"} or \
                not all(_is_int(v) and v > 0 for v in limits.values()):
            add("limits must be {max_steps?, max_count?} with positive integers")
    display = m.get("display")
    if display is not None:
        if not isinstance(display, Mapping) or set(display) != {"width", "height"} or \
                not all(_is_int(v) and v > 0 for v in display.values()):
            add("display must be {width, height} with positive integers")

    experts = m.get("experts")
    expert_ids: List[str] = []
    if not isinstance(experts, list) or not experts:
        add("experts must be a non-empty list")
        experts = []
    for k, e in enumerate(experts):
        where = f"experts[{k}]"
        if not isinstance(e, Mapping):
            add(f"{where} must be an object")
            continue
        if not isinstance(e.get("id"), str) or not ID_PATTERN.match(e["id"]):
            add(f"{where}.id must match {ID_PATTERN.pattern}, got {e.get('id')!r}")
        else:
            expert_ids.append(e["id"])
            where = f"expert {e['id']!r}"
        if "unet" not in e and "path" not in e:
            add(f"{where} needs \"unet\" (a graph) or \"path\" (an Optimum SD folder)")
        for key in ("title", "description", "unet", "path", "text_encoder", "tokenizer", "architecture"):
            if key in e and not isinstance(e[key], str):
                add(f"{where}.{key} must be a string")
        for key in sorted(set(e) - _EXPERT_KEYS):
            add(f"unknown key {where}.{key}")

    ensembles = m.get("ensembles", [])
    ensemble_ids: List[str] = []
    if not isinstance(ensembles, list):
        add("ensembles must be a list")
        ensembles = []
    for k, ens in enumerate(ensembles):
        where = f"ensembles[{k}]"
        if not isinstance(ens, Mapping):
            add(f"{where} must be an object")
            continue
        if not isinstance(ens.get("id"), str) or not ID_PATTERN.match(ens["id"]):
            add(f"{where}.id must match {ID_PATTERN.pattern}, got {ens.get('id')!r}")
        else:
            ensemble_ids.append(ens["id"])
            where = f"ensemble {ens['id']!r}"
        if ens.get("method", "afa") != "afa":
            add(f"{where}.method must be \"afa\"")
        members = ens.get("experts")
        if not isinstance(members, list) or len(members) < 2:
            add(f"{where}.experts must list at least 2 expert ids")
        else:
            for x in members:
                if x not in expert_ids:
                    add(f"{where} names unknown expert {x!r}")
            if len(set(map(str, members))) != len(members):
                add(f"{where} lists an expert twice")
        if not isinstance(ens.get("graph"), str):
            add(f"{where}.graph must be a path (string)")
        if "subsets" in ens and not isinstance(ens["subsets"], bool):
            add(f"{where}.subsets must be true or false")
        for key in ("title", "description"):
            if key in ens and not isinstance(ens[key], str):
                add(f"{where}.{key} must be a string")
        for key in sorted(set(ens) - _ENSEMBLE_KEYS):
            add(f"unknown key {where}.{key}")

    seen = set()
    for x in expert_ids + ensemble_ids:
        if x in seen:
            add(f"the id {x!r} is used twice")
        seen.add(x)

    if package_dir is not None and not problems:
        problems += _check_package_files(m, package_dir)
    if problems:
        raise ManifestError("invalid manifest:\n  " + "\n  ".join(problems))


def _check_package_files(m: Mapping[str, Any], package_dir: str) -> List[str]:
    problems: List[str] = []
    root = os.path.realpath(package_dir)

    def resolve(rel: str, what: str, is_dir: bool = False) -> Optional[str]:
        if os.path.isabs(rel):
            problems.append(f"{what}: {rel!r} must be relative to the package folder")
            return None
        full = os.path.realpath(os.path.join(root, rel))
        if not (full == root or full.startswith(root + os.sep)):
            problems.append(f"{what}: {rel!r} leaves the package folder")
            return None
        if not (os.path.isdir(full) if is_dir else os.path.isfile(full)):
            problems.append(f"{what}: {rel} is missing")
            return None
        return full

    tokenizer = resolve(m.get("tokenizer", "tokenizer"), "tokenizer", is_dir=True)
    if tokenizer:
        for f in ("vocab.json", "merges.txt"):
            resolve(os.path.join(m.get("tokenizer", "tokenizer"), f), "tokenizer")
    text_encoder = resolve(m.get("text_encoder", "text_encoder/model.onnx"), "text_encoder")
    vae = resolve(m.get("vae_decoder", "vae_decoder/model.onnx"), "vae_decoder")
    resolve(m.get("scheduler", "scheduler/scheduler_config.json"), "scheduler")

    def needs(path: Optional[str], what: str, inputs: Iterable[str], outputs: Iterable[str]) -> None:
        if path is None:
            return
        have_in, have_out = graph_io(path)
        lacking = [f"input {n!r}" for n in inputs if n not in have_in] + \
                  [f"output {n!r}" for n in outputs if n not in have_out]
        if lacking:
            problems.append(f"{what} graph lacks {', '.join(lacking)} (has inputs {sorted(have_in)}, "
                            f"outputs {sorted(have_out)})")

    needs(text_encoder, "text_encoder", ["input_ids"], ["last_hidden_state"])
    needs(vae, "vae_decoder", ["latent_sample"], ["sample"])
    unet_inputs = ["sample", "timestep", "encoder_hidden_states"]
    for e in m["experts"]:
        base = e.get("path")
        unet_rel = e.get("unet") or os.path.join(base, "unet", "model.onnx")
        needs(resolve(unet_rel, f"expert {e['id']!r} unet"), f"expert {e['id']!r} unet", unet_inputs, [])
        if e.get("text_encoder") or base:
            resolve(e.get("text_encoder") or os.path.join(base, "text_encoder", "model.onnx"),
                    f"expert {e['id']!r} text_encoder")
        if e.get("tokenizer") or base:
            resolve(e.get("tokenizer") or os.path.join(base, "tokenizer"), f"expert {e['id']!r} tokenizer", True)
    for ens in m.get("ensembles", []):
        what = f"ensemble {ens['id']!r}"
        path = resolve(ens["graph"], what)
        inputs = unet_inputs + (["expert_mask"] if ens.get("subsets") else [])
        needs(path, what, inputs, ["contributions"])
        if path is not None:
            have_in, _ = graph_io(path)
            dims = have_in["encoder_hidden_states"].type.tensor_type.shape.dim if "encoder_hidden_states" in have_in else []
            if len(dims) == 4 and dims[0].dim_value and dims[0].dim_value != len(ens["experts"]):
                problems.append(f"{what}: its graph stacks {dims[0].dim_value} experts, the manifest lists "
                                f"{len(ens['experts'])}")
    return problems


def write_manifest(package_dir: str, manifest: Mapping[str, Any]) -> str:
    """Validates `manifest` against the package folder and writes package_dir/manifest.json."""
    validate_manifest(manifest, package_dir)
    path = os.path.join(package_dir, "manifest.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path
