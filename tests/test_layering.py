"""The library never depends on the bench or the command line: importing every library module
in a fresh interpreter loads neither ``anyorder.bench`` nor ``anyorder.cli``."""

from __future__ import annotations

import json
import subprocess
import sys

# Modules are found on disk (pkgutil.walk_packages would import the bench package to walk it).
SCRIPT = """
import importlib, json, pathlib, sys
import anyorder
root = pathlib.Path(anyorder.__file__).parent
names, optional = [], []
for path in sorted(root.rglob("*.py")):
    parts = ("anyorder",) + path.relative_to(root).with_suffix("").parts
    if parts[1] in ("bench", "cli", "__main__"):
        continue
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    try:
        importlib.import_module(name)
    except ImportError as err:  # an optional extra that is not installed (anyorder[flower])
        if "pip install 'anyorder[" not in str(err):
            raise
        optional.append(name)
        continue
    names.append(name)
print(json.dumps({"imported": names, "optional": optional, "loaded": sorted(sys.modules)}))
"""


def test_library_modules_do_not_import_the_bench_or_the_cli() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "anyorder.distributed.launch" in data["imported"] and len(data["imported"]) > 20
    assert set(data["optional"]) <= {
        "anyorder.federated.flower",
        "anyorder.integrations.hf_trainer",
        "anyorder.integrations.lightning",
    }
    leaked = [m for m in data["loaded"] if m.startswith(("anyorder.bench", "anyorder.cli"))]
    assert leaked == []


def test_no_library_module_imports_the_bench_or_the_cli_even_inside_a_function() -> None:
    """Static: an import inside a function (run only in a spawned worker, say) counts too."""
    import ast
    from pathlib import Path

    import anyorder

    root = Path(anyorder.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("bench", "cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            if any(n.startswith(("anyorder.bench", "anyorder.cli")) for n in names):
                found.append(f"{rel}:{node.lineno}")
    assert found == []
