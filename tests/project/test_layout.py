"""The package's layout: every module imports, the import graph has no cycle, and no module imports
another subpackage's private helpers.

The graph is read from the source (AST), so an import that runs only inside a function counts as
much as one at the top: a cycle closed by a "lazy" import is still a cycle (it only moves the
failure to the first call). Edges:

- ``import fishkern.a.b`` / ``from fishkern.a import b`` / relative imports (resolved against the
  importing module's package) -> the module they name (``from pkg import name``: the submodule
  ``pkg.name`` when there is one, else ``pkg``);
- importing ``a.b.c`` also executes ``a/__init__`` and ``a/b/__init__``: edges to those packages too,
  except to the importer's own ancestors (already running when it imports);
- not counted: imports under ``if TYPE_CHECKING:`` (never executed) and ``importlib.import_module``
  calls (the lazy attribute hooks of ``fishkern`` and ``fishkern.runners``, which import only on
  attribute access, never at module import).

Private: a module or name starting with ``_`` (not dunder). It belongs to the first-level
subpackage it is defined in (``fishkern.diff._io`` and ``fishkern.diff.format._x`` belong to
``fishkern.diff``; a name in a top-level module such as ``fishkern.cli`` belongs to that module).
Top-level private modules (``fishkern._progress``, ``fishkern._native``, ...) are the package's
shared internals, importable anywhere in ``fishkern``.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Import statements that close a cycle and must stay for now: (importer, imported module) -> why.
# Each entry must still exist (a stale entry fails), so the list only shrinks.
CYCLE_ALLOWED = {
    ("fishkern.mask.fishmask", "fishkern.diff._io"):
        "FishMask.save/load use the checkpoint-grade safetensors writer and reader of fishkern.diff (owned "
        "elsewhere); importing it runs fishkern/diff/__init__, whose checkpoint module imports the mask. Goes "
        "away when _io/_validate move below the mask layer (a shared fishkern file-format module).",
    ("fishkern.mask.fishmask", "fishkern.diff._validate"):
        "FishMask.load and mask_from_parts validate with fishkern.diff's field validators; same cycle and the "
        "same fix as fishkern.diff._io above.",
}

# Private helpers imported across subpackages, in files this layout test cannot change (owned by other
# parts of the work) or that wait for a public name elsewhere: (importer, private target) -> why.
# A target is a private module ("fishkern.diff._io") or a private name in a module
# ("fishkern.distributed.fisher._all_reduce_scores"). Each entry must still exist (a stale entry fails).
PRIVATE_ALLOWED = {
    ("fishkern.mask.fishmask", "fishkern.diff._io"):
        "the mask file uses diff's safetensors writer/reader (see CYCLE_ALLOWED); needs a public file-format module",
    ("fishkern.mask.fishmask", "fishkern.diff._validate"):
        "the mask file's field validators are diff's; needs a public file-format module",
    ("fishkern.runners.glue", "fishkern.distributed._comm"):
        "the GLUE density sweep's distributed Fisher pass agrees errors across ranks with Comm; needs "
        "fishkern.distributed to export a public Comm (or a public 'Fisher scores over W ranks' function)",
    ("fishkern.runners.glue", "fishkern.distributed.fisher._all_reduce_scores"):
        "the sweep keeps the summed scores for every density; needs a public score all-reduce in "
        "fishkern.distributed.fisher (fisher_mask_distributed selects one density only)",
    ("fishkern.distributed.masks", "fishkern.diff._validate"):
        "fishkern/distributed (not this part's file): the mask broadcast validates with diff's validators",
    ("fishkern.integrations.hf", "fishkern.diff._io"):
        "fishkern/integrations (not this part's file): cpu_copy / gather_flat / scatter_flat_ should be public",
    ("fishkern.integrations.hf", "fishkern.distributed._comm"):
        "fishkern/integrations (not this part's file): needs a public Comm in fishkern.distributed",
}


# ------------------------------------------------------------------------------- the graph
def modules(root: Path, package: str = "fishkern") -> dict[str, Path]:
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (never executed)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            if (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
                    isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"):
                for child in node.body:
                    skip.update(id(n) for n in ast.walk(child))
    return skip


def import_statements(mods: dict[str, Path], name: str, package: str = "fishkern"):
    """(line, target module, imported name or None) of every import of ``package`` in module ``name``,
    at any depth (functions included), relative imports resolved."""
    tree = ast.parse(mods[name].read_text(encoding="utf-8"), filename=str(mods[name]))
    skip = _type_checking_only(tree)
    base = name if mods[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                if node.level - 1 >= len(parts):
                    raise AssertionError(f"{name}:{node.lineno}: relative import beyond the top-level package")
                parts = parts[: len(parts) - (node.level - 1)]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != package:
                continue
            for alias in node.names:
                yield node.lineno, target, alias.name


def resolve(mods, target: str, name: str | None) -> tuple[str, str | None]:
    """(imported module, imported non-module name or None)."""
    if name is not None and f"{target}.{name}" in mods:
        return f"{target}.{name}", None
    if target not in mods:
        raise AssertionError(f"import of {target!r}: no such module")
    return target, name


def import_graph(mods: dict[str, Path], package: str = "fishkern"):
    """{importer: {imported: {via: line}}}: ``via`` is the module an import statement names; the edges
    to its parent packages come from the same statement (and carry the same ``via``)."""
    graph: dict[str, dict[str, dict[str, int]]] = {m: {} for m in mods}
    for m in mods:
        for line, target, name in import_statements(mods, m, package):
            dest, _ = resolve(mods, target, name)
            parts = dest.split(".")
            parents = [".".join(parts[:i]) for i in range(1, len(parts))]
            for d in [dest] + [p for p in parents if not (m == p or m.startswith(p + "."))]:
                if d != m:
                    graph[m].setdefault(d, {}).setdefault(dest, line)
    return graph


def without(graph, allowed) -> dict:
    """The graph without the edges that only the allowed (importer, via) statements make."""
    out = {}
    for m, edges in graph.items():
        out[m] = {}
        for d, vias in edges.items():
            kept = {v: line for v, line in vias.items() if (m, v) not in allowed}
            if kept:
                out[m][d] = kept
    return out


def cycles(graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph.get(w, ()))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _owner(mods: dict[str, Path], module: str) -> str:
    """The first-level subpackage holding a module (``fishkern.diff`` for ``fishkern.diff._io``), or
    the module itself when it sits at the top (``fishkern.cli``, or ``fishkern``)."""
    parts = module.split(".")
    sub = ".".join(parts[:2])
    return sub if len(parts) >= 2 and sub in mods and mods[sub].name == "__init__.py" else module


def private_imports(mods: dict[str, Path], package: str = "fishkern") -> dict[tuple[str, str], list[int]]:
    """{(importer, private target): lines} for the private modules / names of another subpackage."""
    found: dict[tuple[str, str], list[int]] = {}
    for m in mods:
        for line, target, name in import_statements(mods, m, package):
            dest, attr = resolve(mods, target, name)
            parts = dest.split(".")
            first = next((i for i, p in enumerate(parts) if _private(p)), None)
            hits = []
            if first is not None and first > 1:  # fishkern._progress & co. (first == 1): package-wide
                hits.append((".".join(parts[: first + 1]), _owner(mods, ".".join(parts[:first]))))
            if attr is not None and _private(attr):
                hits.append((f"{dest}.{attr}", _owner(mods, dest)))
            for key, owner in hits[:1]:  # a private name of a private module: one finding, the module
                if _owner(mods, m) != owner:
                    found.setdefault((m, key), []).append(line)
    return found


# ------------------------------------------------------------------------------- the tests
def test_every_module_imports():
    """Each module of the package imports (in one fresh interpreter, in sorted order), without a GPU."""
    names = [m for m in modules(ROOT) if not m.endswith("__main__")]  # __main__ runs the command line
    code = (
        "import importlib, json, sys, traceback\n"
        "bad = {}\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        bad[name] = traceback.format_exc(limit=3)\n"
        "print(json.dumps(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not bad, "\n".join(f"{k}:\n{v}" for k, v in bad.items())


def test_no_import_cycles():
    mods = modules(ROOT)
    graph = import_graph(mods)
    present = {(m, via) for m, edges in graph.items() for vias in edges.values() for via in vias}
    stale = set(CYCLE_ALLOWED) - present
    assert not stale, f"CYCLE_ALLOWED entries whose import no longer exists (remove them): {sorted(stale)}"
    pruned = without(graph, CYCLE_ALLOWED)
    found = cycles(pruned)
    lines = []
    for comp in found:
        members = set(comp)
        lines.append("cycle: " + ", ".join(comp))
        lines += [f"    {a}:{line} imports {via}" for a in comp for b, vias in sorted(pruned[a].items())
                  if b in members for via, line in vias.items()]
    assert not found, "\n".join(lines)
    for entry in CYCLE_ALLOWED:  # each allowed statement does close a cycle (else it needs no entry)
        rest = without(graph, set(CYCLE_ALLOWED) - {entry})
        assert any(entry[0] in comp for comp in cycles(rest)), f"{entry} is allowed but closes no cycle"


def test_no_private_imports_across_subpackages():
    found = private_imports(modules(ROOT))
    new = {k: v for k, v in found.items() if k not in PRIVATE_ALLOWED}
    stale = set(PRIVATE_ALLOWED) - set(found)
    assert not new, "private helpers imported from another subpackage (make them public there, or move them):\n" + \
        "\n".join(f"    {m} (line {', '.join(map(str, ls))}) imports {t}" for (m, t), ls in sorted(new.items()))
    assert not stale, f"PRIVATE_ALLOWED entries that no longer occur (remove them): {sorted(stale)}"


# ------------------------------------------------------------------ the checks themselves
def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return modules(tmp_path)


def test_the_checks_find_cycles_and_private_imports(tmp_path):
    """On a made-up package: a cycle closed by a function-level import, one through a parent package's
    __init__, a TYPE_CHECKING import (ignored), and private imports across / within subpackages."""
    mods = _tree(tmp_path, {
        "fishkern/__init__.py": "",
        "fishkern/_shared.py": "def x(): pass\ndef _y(): pass\n",
        "fishkern/top.py": "def _helper(): pass\n",
        "fishkern/a/__init__.py": "from .one import f\n",
        "fishkern/a/one.py": "from ..b import g\ndef f():\n    from ..b._impl import _h\n",
        "fishkern/a/two.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import z\n"
                             "from .._shared import x\nfrom ..top import _helper\n_x = 1\n",
        "fishkern/b/__init__.py": "def g(): pass\n",
        "fishkern/b/_impl.py": "def _h(): pass\n",
        "fishkern/b/lazy.py": "def k():\n    from fishkern.a import two\n",
        "fishkern/c/__init__.py": "from ..a.two import _x\nfrom .._shared import _y\n",
        "fishkern/c/mod.py": "import fishkern.a.one\n",
    })
    graph = import_graph(mods)
    assert graph["fishkern.b.lazy"] == {"fishkern.a.two": {"fishkern.a.two": 2}, "fishkern.a": {"fishkern.a.two": 2}}
    assert "fishkern.c" not in graph["fishkern.a.two"]  # TYPE_CHECKING only
    assert "fishkern.a" in graph["fishkern.c.mod"]  # importing a.one runs a/__init__
    assert cycles(graph) == []
    (tmp_path / "fishkern/b/__init__.py").write_text("def g():\n    from ..a import one\n")  # lazy, still a cycle
    graph = import_graph(modules(tmp_path))
    assert cycles(graph) == [["fishkern.a", "fishkern.a.one", "fishkern.b"]]
    assert cycles(without(graph, {("fishkern.b", "fishkern.a.one")})) == []  # the statement that closes it
    found = private_imports(mods)
    assert set(found) == {
        ("fishkern.a.one", "fishkern.b._impl"),  # a private module of b, from a
        ("fishkern.a.two", "fishkern.top._helper"),  # a private name of a top-level module
        ("fishkern.c", "fishkern.a.two._x"),  # a private name of another subpackage's module
        ("fishkern.c", "fishkern._shared._y"),  # a private name of a top-level module (even a shared one)
    }  # not: fishkern._shared's public names (package-wide internals), nor privates inside their subpackage
    with pytest.raises(AssertionError, match="no such module"):
        import_graph(_tree(tmp_path / "x", {"fishkern/__init__.py": "from .missing import y\n"}))
