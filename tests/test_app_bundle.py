"""The FAB that `flwr run .` builds from this checkout: every module the ServerApp and
ClientApp import, and none of the reports, tests, benches, data or scripts, which only
weigh on every SuperNode's download (and Flower refuses a FAB over 10 MB)."""

from __future__ import annotations

import io
import subprocess
import zipfile

from flwr.cli.build import build_fab_from_disk

from tests.flower_runtime import REPO, app_dir

APP_PACKAGES = ("server_app", "client_app", "strategies", "models", "task_data", "federation")


def test_the_fab_holds_the_apps_modules_and_nothing_of_docs_tests_or_benches() -> None:
    fab = build_fab_from_disk(app_dir())
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    tracked = subprocess.run(
        ["git", "ls-files", *APP_PACKAGES], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    modules = {name for name in tracked if name.endswith(".py")}
    assert modules and modules <= names, sorted(modules - names)
    top = {name.split("/")[0] for name in names}
    assert top == {*APP_PACKAGES, "pyproject.toml", "README.md", ".info"}, sorted(top)
