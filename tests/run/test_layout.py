"""The package's layout rules: data flows one way (``data -> noise -> distill (+tad) -> evaluate -> report``), and
the orchestration modules stay short."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "ddfast")

# rank of each top-level part of the package: a module may import parts of its own rank or lower. Rank 0 are the
# shared utilities (configs, hashing, files, the compiled ops, networks, augmentation, scale-out helpers), which
# import nothing of a higher rank themselves.
RANK = {"config": 0, "hashing": 0, "io": 0, "_extension": 0, "ops": 0, "models": 0, "augment": 0,
        "distributed": 0, "__init__": 0, "data": 1, "noise": 2, "distill": 3, "tad": 4, "evaluate": 5,
        "baselines": 6, "privacy": 6, "report": 7, "pipeline": 8, "sweep": 9, "cli": 10, "__main__": 10}


def _modules():
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, PKG)
                yield rel, path


def _part(rel: str) -> str:
    head = rel.split(os.sep)[0]
    return head[:-3] if head.endswith(".py") else head


def _imported_parts(path: str, rel: str):
    tree = ast.parse(open(path, encoding="utf-8").read())
    depth = len(rel.split(os.sep)) - 1  # 0 for ddfast/x.py, 1 for ddfast/distill/x.py
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.split(".")[0] == "ddfast":
                    parts = node.module.split(".")[1:]
                    names = [parts[0]] if parts else [a.name for a in node.names]
                else:
                    continue
            elif node.level <= depth:
                continue  # within the same sub-package
            else:
                if node.module:
                    names = [node.module.split(".")[0]]
                else:
                    names = [a.name for a in node.names]
            for n in names:
                yield n, node.lineno


@pytest.mark.parametrize("rel,path", sorted(_modules()))
def test_imports_follow_the_data_flow(rel, path):
    own = _part(rel)
    assert own in RANK, f"ddfast/{rel}: a new top-level module; give it a rank in this test"
    for name, line in _imported_parts(path, rel):
        if name in RANK:
            assert RANK[name] <= RANK[own] or RANK[name] == 0, (
                f"ddfast/{rel}:{line} imports ddfast.{name}, which comes later in data -> noise -> distill (+tad) "
                "-> evaluate -> report")


def test_orchestration_functions_are_short():
    """No function of ddfast.pipeline or ddfast.tad longer than about 60 lines (docstrings excluded)."""
    long = []
    for rel, path in _modules():
        if _part(rel) not in ("pipeline", "tad"):
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                    body = body[1:]
                if body:
                    n = body[-1].end_lineno - body[0].lineno + 1
                    if n > 62:
                        long.append(f"ddfast/{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
