"""What a plain install pulls in: trl (a test's DPO reference) and matplotlib (the report's
plots) are extras; the report says how to get matplotlib where it is missing, and a run's
config.json records the optional packages that are installed."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest

from server_app import report
from server_app.results import package_versions

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("server_app", "client_app", "strategies", "models", "task_data")


def _project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _names(requirements: list[str]) -> set[str]:
    return {r.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip() for r in requirements}


def _imports(path: Path) -> set[str]:
    """Top-level package names imported anywhere in the file (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_trl_and_matplotlib_are_extras_not_runtime_dependencies() -> None:
    project = _project()
    extras = project["optional-dependencies"]
    assert not {"trl", "matplotlib"} & _names(project["dependencies"])
    assert {"trl", "matplotlib"} <= _names(extras["dev"])
    assert _names(extras["report"]) == {"matplotlib"}
    assert project["name"] not in _names(extras["dev"])  # listed directly, not as [report]


def test_the_product_imports_trl_nowhere_and_matplotlib_only_in_the_report() -> None:
    users = {
        name: sorted(
            str(path.relative_to(REPO))
            for package in PRODUCT
            for path in (REPO / package).rglob("*.py")
            if name in _imports(path)
        )
        for name in ("trl", "matplotlib")
    }
    assert users == {"trl": [], "matplotlib": ["server_app/report.py"]}


def test_the_report_says_how_to_install_matplotlib_where_it_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without it sees
    with pytest.raises(ModuleNotFoundError, match=r'pip install "\.\[report\]"'):
        report.write_report([tmp_path], tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "the report's plots need matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["trl", "bitsandbytes"])
def test_config_json_versions_record_the_optional_packages_where_installed(name: str) -> None:
    try:
        installed: str | None = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    versions = package_versions()
    assert versions.get(name) == installed
    assert versions["flwr"] == importlib.metadata.version("flwr")
