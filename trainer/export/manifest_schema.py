"""A model package's manifest.json checked against docs/manifest.schema.json, the one schema.

docs/manifest.schema.json is generated from the engine's zod schema (src/engine/manifest.ts,
`npm run schema`); this module reads it with the `jsonschema` package (Debian: python3-jsonschema)
and adds the rules across fields that JSON Schema does not express, the same list as the engine's
crossFieldRules. What needs the package folder (files exist inside it, graphs have the inputs and
outputs of their role) is not here: it needs onnx and stays with the exporter.

    problems = manifest_problems(manifest)   # [] when valid; else one line each, naming the field
    validate(manifest)                        # raises ManifestSchemaError listing them
    full = with_defaults(manifest)            # a copy with the schema's defaults filled in
    graph_path(manifest["vae_decoder"])       # a graph reference's path for a precision ("fp32" default)

Self-contained on purpose (imports nothing from trainer), so that it can move between packages:
the schema is found by walking up from this file to the folder that holds docs/manifest.schema.json.
"""
from __future__ import annotations

import copy
import json
import os
import re
from functools import lru_cache
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

try:
    import jsonschema
except ImportError as e:  # pragma: no cover - depends on the machine
    raise ImportError("trainer/export/manifest_schema.py needs the jsonschema package "
                      "(Debian: apt-get install python3-jsonschema; scripts/prerequisites.sh installs it)") from e

SCHEMA_FILE = os.path.join("docs", "manifest.schema.json")

Path = Sequence[Union[str, int]]


class ManifestSchemaError(ValueError):
    """A manifest breaks docs/manifest.schema.json or a cross-field rule; .problems lists every way."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid manifest:\n  " + "\n  ".join(self.problems))


def find_schema(start: Optional[str] = None) -> str:
    """docs/manifest.schema.json of the repository that holds `start` (default: this file)."""
    here = os.path.dirname(os.path.abspath(start or __file__))
    while True:
        candidate = os.path.join(here, SCHEMA_FILE)
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(here)
        if parent == here:
            raise FileNotFoundError(f"no {SCHEMA_FILE} in any folder above {os.path.abspath(start or __file__)}")
        here = parent


@lru_cache(maxsize=None)
def load_schema(path: Optional[str] = None) -> Dict[str, Any]:
    with open(path or find_schema(), encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Validation against the schema


def _ecma_pattern(validator, pattern: str, instance: Any, schema: Mapping[str, Any]) -> Iterator[Any]:
    """`pattern` as JavaScript (the engine) reads it: a final `$` matches only at the very end
    (Python's `$` also matches before a final newline, so "a\\n" would pass ^[a-z]$)."""
    if not validator.is_type(instance, "string"):
        return
    compiled = _compile_ecma(pattern)
    if not compiled.search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


@lru_cache(maxsize=None)
def _compile_ecma(pattern: str) -> "re.Pattern[str]":
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


@lru_cache(maxsize=None)
def _validator_class(dialect: str):
    base = jsonschema.validators.validator_for({"$schema": dialect})
    return jsonschema.validators.extend(base, {"pattern": _ecma_pattern})


def _validator(schema: Mapping[str, Any]):
    return _validator_class(schema.get("$schema", ""))(schema)


def field_path(path: Path) -> str:
    """`experts[0].id`; the whole manifest is "the manifest"."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out or "the manifest"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (str, int, float)):
        return repr(value)
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


_MAX_SAFE = 2 ** 53 - 1
_A = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
      "object": "an object", "array": "a list", "null": "null"}


def expected(schema: Mapping[str, Any]) -> str:
    """What a schema asks for, in words: "an integer in 1..1000", "a positive number", …"""
    if "const" in schema:
        return _show(schema["const"])
    if "enum" in schema:
        return "one of [" + ", ".join(_show(v) for v in schema["enum"]) + "]"
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(_A.get(k, k) for k in kind)
    if kind in ("integer", "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        above, below = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if high is not None and high >= _MAX_SAFE:
            high = None  # zod's safe-integer bound: not worth a word
        if above == 0 and high is None and below is None:
            return f"a positive {kind}"
        bounds = []
        if low is not None and high is not None:
            return f"{_A[kind]} in {low}..{high}"
        if low is not None:
            bounds.append(f">= {low}")
        if above is not None:
            bounds.append(f"> {above}")
        if high is not None:
            bounds.append(f"<= {high}")
        if below is not None:
            bounds.append(f"< {below}")
        return " ".join([_A[kind]] + ([" and ".join(bounds)] if bounds else []))
    if kind == "string":
        if "pattern" in schema:
            return f"a string matching {schema['pattern']}"
        if schema.get("minLength") == 1:
            return "a non-empty string"
        if "minLength" in schema:
            return f"a string of at least {schema['minLength']} characters"
        return "a string"
    if kind == "array":
        words = "a list"
        if "minItems" in schema:
            n = schema["minItems"]
            words += f" of at least {n} item{'' if n == 1 else 's'}"
        if schema.get("uniqueItems"):
            words += " without repeats"
        return words
    return _A.get(kind, "valid") if isinstance(kind, str) else "valid"


def _messages(error) -> List[str]:
    at = list(error.absolute_path)
    where = field_path(at)
    kind, value, schema, instance = error.validator, error.validator_value, error.schema, error.instance
    if kind == "required":
        return [f"{field_path(at + [k])} is required" for k in value if k not in instance]
    if kind == "additionalProperties":
        known = set(schema.get("properties", {}))
        patterns = [re.compile(p) for p in schema.get("patternProperties", {})]
        return [f"unknown key {field_path(at + [k])!r}" for k in instance
                if k not in known and not any(p.search(k) for p in patterns)]
    if kind in ("anyOf", "oneOf"):
        if "errorMessage" in schema:
            return [f"{where} {schema['errorMessage']}"]
        if all(set(s) == {"required"} for s in value):
            return [f"{where} needs one of " + ", ".join(repr(k) for s in value for k in s["required"])]
        return [f"{where} matches none of the allowed forms"]
    if kind in ("type", "const", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                "minLength", "maxLength", "pattern", "minItems", "maxItems", "uniqueItems"):
        return [f"{where} must be {expected(schema)}, got {_show(instance)}"]
    return [f"{where}: " + " ".join(error.message.split())]


def schema_problems(manifest: Any, schema: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Every way `manifest` breaks docs/manifest.schema.json, one line each (none: [])."""
    problems: List[str] = []
    for error in _validator(schema or load_schema()).iter_errors(manifest):
        problems += _messages(error)
    return list(dict.fromkeys(problems))


# ---------------------------------------------------------------------------------------------
# The rules across fields (JSON Schema does not express them): the engine's crossFieldRules


def cross_field_problems(m: Mapping[str, Any]) -> List[str]:
    """The cross-field rules, for a manifest that passes the schema (its types are right):
    ids unique across experts and ensembles; an ensemble names listed experts; size.min <= size.max;
    size and defaults.width/height multiples of latent.downsample; defaults inside size."""
    problems: List[str] = []
    add = problems.append
    seen = set()
    ids = [(e["id"], ["experts", k, "id"]) for k, e in enumerate(m["experts"])] + \
          [(e["id"], ["ensembles", k, "id"]) for k, e in enumerate(m.get("ensembles", []))]
    for x, at in ids:
        if x in seen:
            add(f"{field_path(at)}: the id {x!r} is used twice")
        seen.add(x)
    experts = {e["id"] for e in m["experts"]}
    for k, ens in enumerate(m.get("ensembles", [])):
        for j, x in enumerate(ens["experts"]):
            if x not in experts:
                add(f"{field_path(['ensembles', k, 'experts', j])} names unknown expert {x!r}")
    d = m["latent"]["downsample"]
    size = m.get("size")
    if size is not None:
        if size["min"] > size["max"]:
            add(f"size.min {size['min']} > size.max {size['max']}")
        for k in ("min", "max"):
            if size[k] % d:
                add(f"size.{k} {size[k]} is not a multiple of latent.downsample {d}")
    for k in ("width", "height"):
        v = m["defaults"][k]
        if v % d:
            add(f"defaults.{k} {v} is not a multiple of latent.downsample {d}")
        if size is not None and not size["min"] <= v <= size["max"]:
            add(f"defaults.{k} {v} is outside size [{size['min']}, {size['max']}]")
    return problems


def manifest_problems(manifest: Any, schema: Optional[Mapping[str, Any]] = None) -> List[str]:
    """The schema's problems, then (when there are none) the cross-field rules'; [] = valid."""
    problems = schema_problems(manifest, schema)
    return problems or cross_field_problems(manifest)


def validate(manifest: Any, schema: Optional[Mapping[str, Any]] = None) -> None:
    """Raises ManifestSchemaError listing every problem of `manifest` (see manifest_problems)."""
    problems = manifest_problems(manifest, schema)
    if problems:
        raise ManifestSchemaError(problems)


# ---------------------------------------------------------------------------------------------
# Defaults


def _resolve(node: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    while isinstance(node, Mapping) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
        target: Any = root
        for part in node["$ref"][2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def _fill(value: Any, node: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    node = _resolve(node, root)
    if isinstance(value, dict):
        for key, prop in node.get("properties", {}).items():
            if key not in value and "default" in prop:  # a default next to a $ref is the property's own
                value[key] = copy.deepcopy(prop["default"])
            prop = _resolve(prop, root)
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
            if key in value:
                value[key] = _fill(value[key], prop, root)
    elif isinstance(value, list) and isinstance(node.get("items"), Mapping):
        value[:] = [_fill(item, node["items"], root) for item in value]
    return value


def with_defaults(manifest: Mapping[str, Any], schema: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """A deep copy of `manifest` with every absent field that has a `default` in the schema filled
    in (at any depth: experts' descriptions, ensembles' method and subsets, limits' members); what
    the engine's zod reader returns for the same manifest. Optional fields without one stay absent."""
    root = schema or load_schema()
    return _fill(copy.deepcopy(dict(manifest)), root, root)



# ---------------------------------------------------------------------------------------------
# Graph references (docs/model-package.md, "Precision")

PRECISIONS = ("fp32", "fp16")
GraphRef = Union[str, Mapping[str, str]]


def graph_variants(ref: GraphRef) -> Dict[str, str]:
    """{precision: path} of a graph reference: a plain path is a graph computing in float32; an object
    {"fp32": path, "fp16": path} names the graph per precision it computes in (at least one key)."""
    if isinstance(ref, str):
        return {"fp32": ref}
    if isinstance(ref, Mapping):
        variants = {k: v for k, v in ref.items() if k in PRECISIONS and isinstance(v, str)}
        if variants and len(variants) == len(ref):
            return dict(variants)
    raise ValueError(f"a graph reference is a path or {{\"fp32\": path, \"fp16\": path}}, not {_show(ref)}")


def graph_path(ref: GraphRef, precision: str = "fp32") -> str:
    """The path of `ref`'s variant for `precision`, else of the other one (as the engine picks: under
    CUDA it asks for "fp16", on the CPU for "fp32")."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    variants = graph_variants(ref)
    other = "fp16" if precision == "fp32" else "fp32"
    return variants[precision] if precision in variants else variants[other]
