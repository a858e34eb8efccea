"""The package's layout, read from its source with `ast` (nothing is imported):

- the runtime (server, clients, strategies, privacy, training, data, models, config, ...) imports
  nothing from the tools wing (fl_dplora/tools/) or the testing namespace (fl_dplora/testing/);
- no import circle anywhere in the package (imports inside functions count too);
- the tools and the testing namespace import no other module's private `_name`;
- docs/architecture.md names every module of the package;
- run-config keys are read by string (`cfg["seed"]`) only inside fl_dplora/config/: elsewhere the
  RunConfig's attributes (`cfg.train.seed`);
- the tests sit in their layers (tests/unit, integration, e2e, tools; docs/architecture.md#tests-in-four-layers),
  never directly in tests/, and every test file a page or a module names by its path exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "fl_dplora"
WINGS = ("fl_dplora.tools", "fl_dplora.testing")  # not the runtime: may import it, never imported by it
# the front door that dispatches to the tools (`fl-dplora bench`, `experiment`, `audit`)
FRONT_DOORS = {"fl_dplora.cli.tools"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module `name` is (or lies in): a.b.c -> a.b.c, else a.b, ..."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every fl_dplora import of `module`, at any depth."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(r, "", node.lineno) for a in node.names if (r := _resolve(a.name))]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            if not base.startswith("fl_dplora"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:  # `from fl_dplora import protocol`: the module itself
                    found.append((sub, "", node.lineno))
                elif target := _resolve(base):
                    found.append((target, a.name, node.lineno))
    return [f for f in found if f[0] != module]


GRAPH = {m: sorted({t for t, _, _ in _imports(m)}) for m in MODULES}


def _in_wing(module: str) -> bool:
    return any(module == w or module.startswith(w + ".") for w in WINGS)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_the_import_graph_is_read():
    """A guard for the tests below: the walk sees the package and its known edges."""
    assert "fl_dplora.server.loop" in GRAPH and "fl_dplora.tools.bench.cli" in GRAPH
    assert "fl_dplora.protocol" in GRAPH["fl_dplora.server.loop"]
    assert "fl_dplora.tools.bench.common" in GRAPH["fl_dplora.tools.bench.secagg"]
    assert "fl_dplora.testing.inprocess_grid" in GRAPH["fl_dplora.tools.bench.secagg_round"]  # inside a function
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


def test_the_runtime_imports_nothing_from_the_tools_wing():
    bad = [f"{m} imports {t} (line {line})"
           for m in MODULES if not _in_wing(m) and m not in FRONT_DOORS
           for t, _, line in _imports(m) if _in_wing(t)]
    assert not bad, "the runtime must not depend on the tools or the testing namespace:\n" + "\n".join(bad)


def test_no_import_circle_in_the_package():
    cycles = _cycles(GRAPH)
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80  # issue 29: past these a runtime module or function has two jobs


def _too_long(modules: dict[str, Path]) -> list[str]:
    bad = []
    for m, path in modules.items():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            bad.append(f"{m}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    bad.append(f"{m}.{node.name} (line {node.lineno}): {n} lines")
    return bad


def test_no_runtime_module_or_function_is_too_long():
    """The runtime path (everything outside the tools wing and the testing namespace): modules of at most
    400 lines, functions (methods and nested functions included) of at most 80."""
    runtime = {m: p for m, p in MODULES.items() if not _in_wing(m)}
    bad = _too_long(runtime)
    assert not bad, "split these (each has two jobs):\n" + "\n".join(bad)


def test_the_length_check_catches_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n")
    assert _too_long({"long": tmp_path / "long.py"}) == [f"long.f (line 1): {MAX_FUNCTION_LINES + 1} lines"]


def test_the_tools_use_only_public_names_of_other_modules():
    bad = [f"{m} imports {t}.{name} (line {line})"
           for m in MODULES if _in_wing(m)
           for t, name, line in _imports(m) if name.startswith("_") and t != m]
    assert not bad, "a name another module uses is public:\n" + "\n".join(bad)


def test_architecture_doc_names_every_module():
    """docs/architecture.md lists each module by its path under fl_dplora/ (`privacy/modes.py`)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([\w/]+\.py)`", text))
    modules = {str(p.relative_to(PACKAGE)) for p in MODULES.values() if p.name != "__init__.py"}
    missing = sorted(modules - named)
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"



# --- config keys are read by string only inside the config package (issue 29) -----------------------

def schema_keys(schema: Path = PACKAGE / "config" / "schema.py") -> set[str]:
    """The run-config keys: the string keys of the `SCHEMA = {...}` literal of config/schema.py."""
    for node in ast.walk(ast.parse(schema.read_text())):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "SCHEMA" for t in targets):
                return {k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    raise AssertionError(f"no SCHEMA literal in {schema}")


def string_key_reads(modules: dict[str, Path], keys: set[str]) -> list[tuple[str, str, int]]:
    """(module, key, line) of every `x["key"]`, `x.get/pop/setdefault("key")` with a run-config key
    as a string constant; `SCHEMA["key"]` (the key's schema entry, not a value) is not a read."""
    found = []
    for m, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            key = None
            if (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and isinstance(node.slice, ast.Constant)
                    and not (isinstance(node.value, ast.Name) and node.value.id == "SCHEMA")):
                key = node.slice.value
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop", "setdefault")
                  and node.args and isinstance(node.args[0], ast.Constant)):
                key = node.args[0].value
            if isinstance(key, str) and key in keys:
                found.append((m, key, node.lineno))
    return sorted(found)


# Reads of records that are not a RunConfig, whose fields share a key's name: (module, key) -> (how many, why).
# The count is exact, so a new read of the same key in the same module fails until it is looked at.
NOT_RUN_CONFIG_READS = {
    ("fl_dplora.adapter_io", "delta"): (1, "the run summary's privacy record (the delta it spent)"),
    ("fl_dplora.adapter_io", "accountant"): (1, "the run summary's privacy record (the accountant it used)"),
    ("fl_dplora.adapter_record", "model"): (4, "adapter.json's base-model field"),
    ("fl_dplora.checkpoint", "task"): (1, "an old checkpoint's saved config, read before migration makes it a RunConfig"),
    ("fl_dplora.cli.run", "loss"): (1, "the final eval's loss metric"),
    ("fl_dplora.server.outputs", "loss"): (2, "the last eval's loss metric"),
    ("fl_dplora.tools.audit.run", "delta"): (1, "the run summary's privacy record (the delta it spent)"),
    ("fl_dplora.tools.audit.report", "delta"): (1, "audit.json's delta"),
    ("fl_dplora.tools.experiments.runner", "loss"): (2, "the summary's eval and test loss metrics"),
    ("fl_dplora.tools.experiments.runner", "delta"): (1, "the summary's privacy record (the delta it spent)"),
    ("fl_dplora.tools.experiments.results", "seed"): (5, "results.json records' seed field"),
    ("fl_dplora.tools.experiments.results", "task"): (1, "results.json records' task field"),
}


def _outside_config(modules: dict[str, Path]) -> dict[str, Path]:
    return {m: p for m, p in modules.items() if m != "fl_dplora.config" and not m.startswith("fl_dplora.config.")}


def _scanned() -> dict[str, Path]:
    """The package outside config/, and the experiment scripts (experiments/**/*.py, not their results)."""
    scripts = {str(p.relative_to(REPO)): p for p in sorted((REPO / "experiments").rglob("*.py"))
               if "results" not in p.relative_to(REPO / "experiments").parts}
    return {**_outside_config(MODULES), **scripts}


def test_config_keys_are_read_by_string_only_inside_the_config_package():
    """Outside fl_dplora/config/ a run-config value is an attribute of the RunConfig (cfg.train.seed),
    never `cfg["seed"]` or `cfg.get("seed")`."""
    reads = string_key_reads(_scanned(), schema_keys())
    assert any(m.startswith("experiments/") for m in _scanned())
    counts: dict[tuple[str, str], list[int]] = {}
    for m, key, line in reads:
        counts.setdefault((m, key), []).append(line)
    bad = [f"{m}: {key!r} read {len(lines)}x (lines {lines}), allowed {NOT_RUN_CONFIG_READS.get((m, key), (0,))[0]}"
           for (m, key), lines in counts.items() if len(lines) != NOT_RUN_CONFIG_READS.get((m, key), (0,))[0]]
    assert not bad, "read the RunConfig's attribute (cfg.<section>.<field>) instead:\n" + "\n".join(bad)


def test_the_allow_list_of_string_key_reads_has_no_stale_entry():
    reads = {(m, key) for m, key, _ in string_key_reads(_scanned(), schema_keys())}
    stale = sorted(set(NOT_RUN_CONFIG_READS) - reads)
    assert not stale, f"no such read any more, drop it from NOT_RUN_CONFIG_READS: {stale}"


def test_the_string_key_check_catches_a_planted_read(tmp_path):
    assert {"seed", "dp-mode", "delta"} <= schema_keys() and "id" not in schema_keys()
    (tmp_path / "planted.py").write_text(
        'def f(cfg, rec):\n'
        '    a = cfg["seed"]\n'
        '    b = cfg.get("dp-mode", "none")\n'
        '    c = SCHEMA["seed"].default + rec["id"] + cfg.train.seed\n'
        '    cfg["seed"] = 1\n')
    assert string_key_reads({"planted": tmp_path / "planted.py"}, schema_keys()) == [
        ("planted", "dp-mode", 3), ("planted", "seed", 2)]

# --- the tests' own layout ---------------------------------------------------------------------------

TESTS = REPO / "tests"
LAYERS = ("unit", "integration", "e2e", "tools")


def _is_test_file(path: Path) -> bool:
    return path.suffix == ".py" and (path.name.startswith("test_") or path.stem.endswith("_test"))


def stray_test_files(tests: Path) -> list[str]:
    """Test files outside tests/<layer>/: directly in tests/ (where only what every layer shares
    lives: conftest.py, harness.py), or in a folder that is no layer."""
    return sorted(str(p.relative_to(tests.parent)) for p in tests.rglob("*.py")
                  if _is_test_file(p) and p.relative_to(tests).parts[0] not in LAYERS)


def test_every_test_file_sits_in_a_layer():
    stray = stray_test_files(TESTS)
    assert not stray, (f"move these into one of tests/{{{','.join(LAYERS)}}}/ (docs/architecture.md, "
                       "section 'Tests in four layers'): " + ", ".join(stray))
    assert all(any((TESTS / layer).glob("test_*.py")) for layer in LAYERS)


def test_the_layer_check_catches_a_stray_file(tmp_path):
    tests = tmp_path / "tests"
    for name in ("conftest.py", "harness.py", "unit/test_ok.py", "test_flat.py", "misc/test_lost.py", "helper.py"):
        (tests / name).parent.mkdir(parents=True, exist_ok=True)
        (tests / name).write_text("")
    assert stray_test_files(tests) == [f"tests/{name}" for name in ("misc/test_lost.py", "test_flat.py")]


def test_every_test_path_named_in_the_repo_exists():
    """`tests/<layer>/test_x.py` in the README, docs/, the package, experiments/ (not its results),
    the Makefile, CI and the tests themselves names a file that is there (a moved test leaves none behind)."""
    sources = [REPO / "README.md", REPO / "Makefile", REPO / ".ci" / "run", REPO / "pyproject.toml",
               *(REPO / "docs").glob("*.md"), *PACKAGE.rglob("*.py"), *TESTS.rglob("*.py"),
               *(p for p in (REPO / "experiments").rglob("*") if p.suffix in {".md", ".py", ".toml"}
                 and "results" not in p.relative_to(REPO / "experiments").parts)]
    missing = sorted({f"{p.relative_to(REPO)}: {m}" for p in sources if p.is_file()
                      for m in re.findall(r"\btests/[\w/]+\.py\b", p.read_text(errors="replace"))
                      if not (REPO / m).is_file()})
    assert not missing, "no such test file:\n" + "\n".join(missing)
