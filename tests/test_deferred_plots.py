"""task_data.deferred_plots: a ClientApp process imports flwr-datasets' partitioners without
its plotting stack, also through the training handlers (torch's import scans every module in
sys.modules with ``inspect.getmodule``), and the plotting helpers still work when asked for."""

import subprocess
import sys

from task_data.deferred_plots import NAME, defer_visualization
from tests.flower_runtime import REPO


def _python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_the_client_app_imports_no_plotting_library_and_the_plots_still_load() -> None:
    out = _python(
        "import sys\n"
        "import client_app.app, client_app.round_handlers, task_data.partition\n"
        "heavy = ('seaborn', 'matplotlib', 'scipy.stats')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "import flwr_datasets\n"
        "held = flwr_datasets.visualization\n"
        "from flwr_datasets.visualization import plot_label_distributions\n"
        "real = sys.modules['flwr_datasets.visualization']\n"
        "print(plot_label_distributions.__module__, flwr_datasets.visualization is real,\n"
        "      'seaborn' in sys.modules, held is not real and held.__file__ == real.__file__)\n"
    )
    before, after = out.splitlines()
    assert before == "[]"
    # The stand-in gave way to the real module, in sys.modules and on the package; a copy
    # taken before (as flwr_datasets' own __init__ takes one) forwards to it, dunders too.
    assert after == "flwr_datasets.visualization.label_distribution True True True"


def test_once_flwr_datasets_is_imported_the_deferral_changes_nothing() -> None:
    import flwr_datasets  # noqa: F401 - this process's copy, with whichever module it holds

    held = sys.modules[NAME]
    defer_visualization()
    assert sys.modules[NAME] is held
