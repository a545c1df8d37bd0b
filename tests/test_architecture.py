"""The structure the code promises: imports run one way, the analysis package never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

from conftest import REPO

# Layers of mdlm_sched, bottom up: a module imports only from its own layer or below (never upwards), and the
# import graph has no cycle. The command-line entry points sit on top and alone compose the library with the
# report (the analysis package).
LAYERS = [
    # no torch: the analysis package reads through these
    {"errors", "fileio", "sweep_records", "artifacts", "schedule", "stats", "summary", "sweep_compare", "architecture",
     "config", "ranks"},
    {"noise", "config_checks", "config_load", "data", "diffusion", "runtime", "provenance", "distributed",
     "sampling_config", "hub",
     "models.mla", "models.mha", "models.head_loss", "models.latent_steps", "models.denoiser", "models.loading",
     "models.mdlm_format", "models.transmla",
     "models", "flops",
     "objectives", "latent_cache",
     "optimise"},  # maths, configs, models
    {"sampler", "cudagraph", "modelset", "metrics", "checkpoint"},  # sampling and loading
    {"generate", "per_step", "sweep", "sweep_mauve", "train", "convert"},  # stages
    {"pipeline"},
    {"cli", "cli_inputs", "__main__"},  # entry points
]
ENTRY_POINTS = {"cli", "__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO / "mdlm_sched").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def _imports(path: Path) -> set[str]:
    """Top-level modules of mdlm_sched and analysis that `path` imports at run time (TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found.update(n for n in names if n.split(".")[0] in ("mdlm_sched", "analysis"))
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): {m.removeprefix("mdlm_sched.") for m in _imports(p)}
            for p in (REPO / "mdlm_sched").rglob("*.py")}


def test_imports_run_one_way():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    graph = _graph()
    assert set(graph) - {"__init__"} == set(layer), "every module has a layer"
    for module, deps in graph.items():
        for dep in deps:
            if dep.startswith("analysis"):
                assert module in ENTRY_POINTS, f"{module} imports {dep}: only the entry points may"
                continue
            assert layer[dep] <= layer[module], f"{module} (layer {layer[module]}) imports {dep} (layer {layer[dep]})"
    try:
        list(TopologicalSorter({m: d - {"__init__"} for m, d in graph.items() if m != "__init__"}).static_order())
    except CycleError as exc:
        raise AssertionError(f"import cycle: {exc.args[1]}") from None


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_the_analysis_package_loads_no_torch_and_no_model_code():
    loaded = _loaded_after("import analysis.report, analysis.plots")
    assert "mdlm_sched" in loaded and not loaded & {"torch", "transformers", "safetensors"}


def test_no_library_module_imports_analysis():
    library = [_module_name(p) for p in (REPO / "mdlm_sched").rglob("*.py")]
    library = [m for m in library if m not in ENTRY_POINTS | {"__init__"}]
    assert "analysis" not in _loaded_after("; ".join(f"import mdlm_sched.{m}" for m in library))


def test_no_module_is_longer_than_about_400_lines():
    for path in [*(REPO / "mdlm_sched").rglob("*.py"), *(REPO / "analysis").rglob("*.py")]:
        lines = len(path.read_text().splitlines())
        assert lines <= 420, f"{path.relative_to(REPO)} has {lines} lines: split it by job"


def test_the_analysis_package_is_imported_at_module_level_only():
    """The entry points' dependency on analysis is plain: no function imports it."""
    for path in [*(REPO / "mdlm_sched").rglob("*.py"), *(REPO / "analysis").rglob("*.py")]:
        for func in ast.walk(ast.parse(path.read_text())):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    module = node.module if isinstance(node, ast.ImportFrom) else None
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
                    assert not any(n.split(".")[0] == "analysis" for n in names), \
                        f"{path.relative_to(REPO)}:{node.lineno} imports analysis inside {func.name}()"
