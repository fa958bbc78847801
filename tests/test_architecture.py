"""The package's shape, checked: no import cycles, one durable writer, a serve path without training.

These read the source (or import in a fresh interpreter), so a change that breaks the layout the
architecture doc describes fails here, with the offending module named.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import manyinone

PACKAGE = Path(manyinone.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("manyinone", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the manyinone modules it imports anywhere (top level or inside a function)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        # A package's __init__ is imported with any of its modules: not an edge worth a cycle.
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")
                       and d != "manyinone"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, stack + [dep])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "manyinone.runtime.server" in graph  # the scan saw the subpackages
    assert find_cycle(graph) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["manyinone.elastic.router"].add("manyinone.io.api")  # what router always did
    graph["manyinone.io.api"].add("manyinone.elastic.router")  # what api did before the redesign
    assert find_cycle(graph) is not None


def test_renames_and_fsyncs_happen_only_in_the_durable_writer():
    """One owner for durable writes: os.replace / os.fsync appear in io/durable.py only (integrity's
    file_digest may fsync the file it just hashed)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                    and node.attr in ("replace", "rename", "fsync"):
                if name != "io/durable.py" and not (name == "io/integrity.py" and node.attr == "fsync"):
                    offenders.append(f"{name}:{node.lineno} os.{node.attr}")
    assert offenders == []


def test_serving_imports_no_training_code(trained_run):
    """`manyinone serve`'s path (Runtime.open, the server app, prompt encoding) loads no training loop."""
    code = f"""
import sys
from manyinone.runtime.generate import Runtime
from manyinone.runtime.server import create_app
rt = Runtime.open({str(trained_run)!r}, device="cpu", graphs=False)
rt.encode("hello")
create_app(rt, "m")
training = sorted(m for m in sys.modules if m.split(".")[:2] == ["manyinone", "train"]
                  and m.rsplit(".", 1)[-1] in ("loop", "distributed", "samplers", "losses", "config", "interrupt"))
print(training)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


LLAMA_NAMES = {"embed_tokens", "rotary_emb", "k_proj", "q_proj", "v_proj", "o_proj", "lm_head", "self_attn",
               "gate_proj", "up_proj", "down_proj"}


def test_no_architecture_attribute_names_outside_adapters():
    """The runtime (and all of manyinone/) gets the model's modules from its adapter (`decoder_stack`),
    never by one architecture's attribute names."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in LLAMA_NAMES:
                offenders.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("hasattr", "getattr") and \
                    len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in LLAMA_NAMES:
                offenders.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno} {node.func.id}(.., {node.args[1].value!r})")
    assert any(p.parent.name == "runtime" for p in PACKAGE.rglob("*.py"))
    assert offenders == []


def test_plan_users_check_the_declared_protocol_not_hasattr():
    """Width/heads callers go through core.adapter.PlanAdapter (require_plans), never hasattr duck typing."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr" and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.Constant) and node.args[1].value in (
                        "extract_plan", "forward_plan", "masked", "intermediate", "num_heads", "unit_importance"):
                offenders.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno}")
    assert offenders == []
