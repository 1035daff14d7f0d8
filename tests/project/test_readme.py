"""README.md says only what the code does: every Python block parses, every fishkern name it uses
exists, every keyword it passes to a fishkern callable is accepted, the self-contained blocks run,
and every `fishkern ...` command line in a shell block parses with the real CLI parser."""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as _f:
    README = _f.read()


def _blocks(lang: str) -> list[tuple[int, str]]:
    out = []
    for m in re.finditer(r"^```" + lang + r"\n(.*?)^```", README, re.S | re.M):
        out.append((README[: m.start()].count("\n") + 1, m.group(1)))
    return out


PYTHON = _blocks("python")
BASH = _blocks("bash")


def test_the_readme_has_code_to_check():
    assert len(PYTHON) >= 6 and len(BASH) >= 4


@pytest.mark.parametrize("line,code", PYTHON, ids=[f"line{n}" for n, _ in PYTHON])
def test_python_blocks_parse(line, code):
    ast.parse(code)


def _resolve(node, names: dict):
    """The object an expression names (fishkern imports, attributes of them, variables bound to an
    instance of a fishkern class), or None when it is not ours to check."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, names)
        if base is None:
            return None
        if not hasattr(base, node.attr):
            raise AssertionError(f"{ast.unparse(node)}: {base!r} has no attribute {node.attr!r}")
        return getattr(base, node.attr)
    return None


def _check_block(code: str):
    tree = ast.parse(code)
    names: dict = {}
    checked = 0
    for node in ast.walk(tree):  # imports first: they bind the names the rest uses
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fishkern":
                    names[a.asname or a.name.split(".")[0]] = importlib.import_module(a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fishkern":
            mod = importlib.import_module(node.module)
            for a in node.names:
                assert hasattr(mod, a.name), f"from {node.module} import {a.name}: no such name"
                names[a.asname or a.name] = getattr(mod, a.name)
    names.setdefault("fishkern", importlib.import_module("fishkern"))
    for stmt in ast.walk(tree):
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call):
            target = _resolve(stmt.value.func, names)
            if inspect.isclass(target):  # `opt = fishkern.MaskedAdamW(...)`: opt.<method> is checked too
                for t in stmt.targets:
                    if isinstance(t, ast.Name):
                        names[t.id] = target
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            _resolve(node, names)  # raises on a missing attribute
        if not isinstance(node, ast.Call):
            continue
        fn = _resolve(node.func, names)
        if fn is None or not callable(fn):
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        params = sig.parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            accepted = None  # **kwargs: cannot tell
        else:
            accepted = set(params)
        for kw in node.keywords:
            if kw.arg is not None and accepted is not None:
                assert kw.arg in accepted, f"{ast.unparse(node.func)}(..., {kw.arg}=...): no such argument {sorted(accepted)}"
                checked += 1
    return checked


@pytest.mark.parametrize("line,code", PYTHON, ids=[f"line{n}" for n, _ in PYTHON])
def test_python_blocks_use_names_and_arguments_that_exist(line, code):
    _check_block(code)


def test_the_checker_catches_drift():
    with pytest.raises(AssertionError, match="no such argument"):
        _check_block("import fishkern\nfishkern.MaskedAdamW(p, m, learning_rate=1)\n")
    with pytest.raises(AssertionError, match="no attribute"):
        _check_block("import fishkern\nfishkern.MaskedAdamWW(p, m)\n")
    with pytest.raises(AssertionError, match="no attribute"):
        _check_block("import fishkern\nopt = fishkern.MaskedAdamW(p, m)\nopt.clip_grad_norm(1.0)\n")
    assert _check_block("import fishkern\nopt = fishkern.MaskedAdamW(p, m, lr=1)\nopt.clip_grad_norm_(max_norm=1.0)\n") == 2


def _self_contained(code: str) -> bool:
    tree = ast.parse(code)
    bound = {"torch", "fishkern", "range", "list", "max", "print", "len"}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Name,)) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.comprehension):
            bound.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return used <= bound and "..." not in code


def test_self_contained_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runnable = [(n, c) for n, c in PYTHON if _self_contained(c)]
    assert runnable, "the quickstart should be runnable as written"
    for line, code in runnable:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def _fishkern_commands() -> list[tuple[int, list[str]]]:
    cmds = []
    for start, code in BASH:
        for i, raw in enumerate(code.splitlines()):
            text = raw.split("  #")[0].split(" # ")[0].strip()
            if text.startswith("torchrun ") and " -m fishkern " in text:
                text = "fishkern " + text.split(" -m fishkern ", 1)[1]
            if not text.startswith("fishkern ") or text.endswith("..."):
                continue
            cmds.append((start + i + 1, shlex.split(text)[1:]))
    return cmds


def test_every_fishkern_command_line_parses():
    from fishkern.cli import build_parser

    cmds = _fishkern_commands()
    assert len(cmds) >= 6
    for line, argv in cmds:
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"README.md:{line}: `fishkern {' '.join(argv)}` does not parse") from e


def test_install_section_names_what_ci_tests():
    # the install table and .ci/run must not drift apart
    with open(os.path.join(ROOT, "scripts", "ci_installs.sh"), encoding="utf-8") as f:
        ci = f.read()
    oldest = re.search(r'OLDEST_TORCH=\$\{FISHKERN_CI_OLDEST_TORCH:-([0-9.]+)\}', ci).group(1)
    oldest_tf = re.search(r'OLDEST_TRANSFORMERS=\$\{FISHKERN_CI_OLDEST_TRANSFORMERS:-([0-9.]+)\}', ci).group(1)
    install = README[README.index("## Install"):README.index("## FISH fine-tuning")]
    assert oldest in install and oldest_tf in install
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        floor = re.search(r'"torch>=([0-9.]+)"', f.read()).group(1)
    assert oldest.startswith(floor), f"pyproject claims torch>={floor} but CI tests {oldest}"
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        run = f.read()
    assert "bash scripts/test.sh" in run and "scripts/ci_installs.sh" in run
    assert "bash scripts/test.sh" in README[: README.index("## Status")]
