"""The shape of the code: pipeline/ is a package whose modules import each other in one direction."""
from __future__ import annotations

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"

# Modules that every stage builds on. They never import a stage (a command's module): the data
# flows from them to the stages, never back.
FOUNDATIONS = {"util", "config", "storage", "store", "sparsity", "transcoder", "topn", "contexts", "run"}
STAGES = {"cache", "train", "collect", "export", "evaluate", "demo", "info"}


def import_graph() -> dict[str, set[str]]:
    """module -> the pipeline modules it imports, at the top or inside a function."""
    modules = {p.stem for p in PIPELINE.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((PIPELINE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
        graph[name] = deps & modules - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in path:
                found.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])
    return found


def test_pipeline_is_a_package():
    assert (PIPELINE / "__init__.py").exists()


def test_no_import_cycle_in_pipeline():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_foundations_never_import_a_stage():
    graph = import_graph()
    assert FOUNDATIONS | STAGES <= set(graph), sorted(FOUNDATIONS | STAGES - set(graph))
    wrong = {m: sorted(graph[m] & STAGES) for m in FOUNDATIONS if graph[m] & STAGES}
    assert wrong == {}


def test_only_the_run_module_names_the_run_folder_files():
    """The run folder's file names are literals in pipeline/run.py alone."""
    names = ['"summary.json"', '"transcoder.safetensors"', '"eval.json"', '"metrics.jsonl"', '"latest"',
             '"activation_samples"', '"collect.json"', '"state.pt"']
    found = {p.stem: [n for n in names if n in p.read_text()] for p in PIPELINE.glob("*.py") if p.stem != "run"}
    assert {m: n for m, n in found.items() if n} == {}
