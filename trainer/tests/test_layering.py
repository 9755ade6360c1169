"""The trainer's import structure, read from the source (every import statement, also inside functions).

A module may import modules of its own sub-package and of sub-packages in lower layers, nothing else:
no import goes up a layer or sideways to another sub-package of the same layer, and nothing outside
trainer/demo/ imports the demo (the command shims excepted). The command shims in trainer/ (kept so
that `python3 -m trainer.<name>` works) may import anything and nothing imports them. No two modules
import each other, directly or through others.
"""
import ast
import os
import subprocess
import sys
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from trainer import REPO_ROOT

TRAINER = os.path.join(REPO_ROOT, "trainer")

# sub-package -> layer; a sub-package imports only its own modules and those of lower layers
LAYERS: Dict[str, int] = {
    "models": 0,     # the networks (torch modules)
    "text": 0,       # the BPE tokenizer
    "diffusion": 1,  # schedules, losses, the reference sampler
    "io": 1,         # weight files, checkpoints, model folders, PNG
    "training": 2,   # objectives, the loop, data, config files, the train CLI
    "export": 3,     # ONNX graphs, fp16, parity, manifests, packages
    "fixture": 4,    # the engine's tiny test package
    "demo": 4,       # the shapes-world demo zoo and its build
    "importer": 4,   # SD1.x checkpoints -> a package (npm run import)
}
ROOT = "trainer"          # trainer/__init__.py: REPO_ROOT only; anything may import it
COMMAND = "<command>"     # trainer/<name>.py: the `python3 -m trainer.<name>` shims

# `python3 -m trainer.<name>` -> the module whose main() it runs
COMMANDS = {
    "trainer.train": "trainer.training.cli",
    "trainer.export": "trainer.export.spec",
    "trainer.build_demo": "trainer.demo.build",
    "trainer.eval_reference": "trainer.demo.eval_reference",
    "trainer.routing_signal": "trainer.demo.routing_signal",
    "trainer.fixture": "trainer.fixture.tiny",
    "trainer.importer": "trainer.importer.cli",
}


def _modules() -> Dict[str, str]:
    """module name -> file, for every .py under trainer/ (tests included)."""
    found = {}
    for folder, dirs, files in os.walk(TRAINER):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "runs", "products"))
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), REPO_ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = os.path.join(folder, f)
    return found


MODULES = _modules()
LIBRARY = {m: f for m, f in MODULES.items() if not m.startswith("trainer.tests")}
TESTS = {m: f for m, f in MODULES.items() if m.startswith("trainer.tests")}


def _resolve(name: str) -> str:
    """The module an imported name refers to: itself if it is one, else its longest module prefix."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(module: str) -> Iterator[Tuple[int, str]]:
    """(line, imported trainer module) for every import statement of `module`."""
    path = MODULES[module]
    package = module if os.path.basename(path) == "__init__.py" else module.rsplit(".", 1)[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            if name == ROOT or name.startswith(ROOT + "."):
                yield node.lineno, _resolve(name)


def part(module: str) -> str:
    """The sub-package a module belongs to; COMMAND for the shims in trainer/, ROOT for trainer itself."""
    if module == ROOT:
        return ROOT
    pieces = module.split(".")
    if len(pieces) == 2 and not os.path.basename(MODULES[module]) == "__init__.py":
        return COMMAND
    return pieces[1]


def test_every_sub_package_has_a_layer():
    parts = {part(m) for m in LIBRARY} - {ROOT, COMMAND}
    assert parts == set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS (or drop {sorted(set(LAYERS) - parts)})"


def test_imports_go_down_the_layers():
    wrong = []
    for module in sorted(LIBRARY):
        source = part(module)
        for line, target in imports(module):
            dest = part(target)
            if dest == ROOT or source == COMMAND or dest == source:
                ok = dest != COMMAND or source == COMMAND
            elif dest == COMMAND or source == ROOT:
                ok = False
            else:
                ok = LAYERS[dest] < LAYERS[source]
            if not ok:
                wrong.append(f"{MODULES[module]}:{line}: {module} ({source}) imports {target} ({dest})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_nothing_outside_demo_imports_demo():
    wrong = []
    for module in sorted(MODULES):
        if module.startswith(("trainer.demo", "trainer.tests.demo")) or part(module) == COMMAND:
            continue
        wrong += [f"{MODULES[module]}:{line}: {target}" for line, target in imports(module)
                  if target.startswith("trainer.demo")]
    assert not wrong, "demo imported from outside trainer/demo:\n" + "\n".join(wrong)


def test_tests_use_the_library_not_the_command_shims():
    wrong = [f"{MODULES[module]}:{line}: {target}" for module in sorted(TESTS) for line, target in imports(module)
             if target in MODULES and part(target) == COMMAND]
    assert not wrong, "\n".join(wrong)


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = {m: {t for _, t in imports(m) if t in LIBRARY} for m in LIBRARY}
    assert not _cycles(graph), f"modules that import each other: {_cycles(graph)}"


def test_the_cycle_check_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]] and _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_is_long_without_a_reason():
    """Past 500 lines a module says why at its top (a line starting `# Long:`)."""
    long = []
    for module, path in sorted(MODULES.items()):
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if len(lines) > 500 and not any(line.startswith("# Long:") for line in lines[:5]):
            long.append(f"{path}: {len(lines)} lines")
    assert not long, "\n".join(long)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_shims_run_the_modules_main(command):
    import importlib

    shim = command if part(command) == COMMAND else command + ".__main__"
    assert importlib.import_module(shim).main is importlib.import_module(COMMANDS[command]).main


def test_commands_answer_help():
    """`python3 -m trainer.<name> --help` for every command (one interpreter, so torch loads once)."""
    code = ("import runpy, sys\n"
            "for name in sys.argv[1:]:\n"
            "    sys.argv = [name, '--help']\n"
            "    try:\n"
            "        runpy.run_module(name, run_name='__main__', alter_sys=True)\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, (name, e.code)\n"
            "    else:\n"
            "        raise AssertionError(name + ' did not parse --help')\n"
            "    print('ok', name)\n")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run([sys.executable, "-c", code, *sorted(COMMANDS)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for line in result.stdout.splitlines() if line.startswith("ok ")] == \
        [f"ok {name}" for name in sorted(COMMANDS)]
