"""The packages import one way: server_app and client_app on top, never importing each other;
strategies below server_app; federation below both apps; models and task_data at the bottom.

A ClientApp must not load the server's code (nor the server the client's) just to agree on a
name or a config; what both need lives in ``federation``. Every import counts, module-level
or inside a function, absolute or relative.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What each layer may import besides itself. models and task_data import nothing of ours
# today (not even each other), and stay that way.
ALLOWED = {
    "server_app": {"strategies", "federation", "models", "task_data"},
    "client_app": {"federation", "models", "task_data"},
    "strategies": {"federation", "models", "task_data"},
    "federation": {"models", "task_data"},
    "models": set(),
    "task_data": set(),
}
# Ours but no layer: product code never imports them.
NOT_LAYERS = {"tests", "bench", "scripts"}


def _imported(tree: ast.Module, package: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in ``tree``, relative ones resolved against
    ``package``, the file's package (``from . import x`` is ``package.x``)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, name] if name else base)
            out.append((node.lineno, name))
    return out


def layer_violations(root: Path) -> list[str]:
    """``file:line: layer imports name`` for every import against the layering under ``root``."""
    ours = set(ALLOWED) | NOT_LAYERS
    problems = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((root / layer).rglob("*.py")):
            package = path.relative_to(root).parent.parts  # pkg/__init__.py too: pkg
            tree = ast.parse(path.read_text(), filename=str(path))
            for line, name in _imported(tree, package):
                top = name.split(".")[0]
                if top in ours and top != layer and top not in allowed:
                    where = path.relative_to(root)
                    problems.append(f"{where}:{line}: {layer} imports {name}")
    return problems


def test_packages_import_only_downwards() -> None:
    assert all((ROOT / layer).is_dir() for layer in ALLOWED)
    assert layer_violations(ROOT) == []


def test_the_checker_names_each_wrong_import(tmp_path: Path) -> None:
    """A fake tree with one wrong import of each kind the checker must see."""
    files = {
        "client_app/app.py": "import os\nfrom server_app.run_config import RunConfig\n",
        "client_app/deep/step.py": "def f():\n    import strategies.fedbiot\n",
        "server_app/app.py": "from client_app import node\nfrom . import helpers\n",
        "server_app/helpers.py": "from ..client_app.exchange import GRADIENT\n",
        "strategies/fedbiot.py": "from federation.messages import DELTA_C\nimport server_app.app\n",
        "federation/run_config.py": "from models.wire import to_record\nimport tests.tiny\n",
        "models/lora.py": "from .blocks import get_blocks\nfrom task_data import collate\n",
        "task_data/__init__.py": "from task_data.sources import load\nfrom federation import x\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sorted(layer_violations(tmp_path)) == [
        "client_app/app.py:2: client_app imports server_app.run_config",
        "client_app/deep/step.py:2: client_app imports strategies.fedbiot",
        "federation/run_config.py:2: federation imports tests.tiny",
        "models/lora.py:2: models imports task_data",
        "server_app/app.py:1: server_app imports client_app",
        "server_app/helpers.py:1: server_app imports client_app.exchange",
        "strategies/fedbiot.py:2: strategies imports server_app.app",
        "task_data/__init__.py:2: task_data imports federation",
    ]
