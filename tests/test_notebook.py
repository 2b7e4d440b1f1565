"""The scripts in a real Jupyter kernel, cell by cell as a user runs them: main([...]) called from a cell, the
whole script pasted into a cell under a sys.argv the user set, and the kernel's own argv left alone."""
import json
from pathlib import Path

import pytest

import exp01_shutdown_baseline

pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel (requirements-dev.txt)")
nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (requirements-dev.txt)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (requirements-dev.txt)")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "exp01_shutdown_baseline.py"


def cell_text(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_exp01_in_a_notebook(tmp_path):
    called, pasted = tmp_path / "called", tmp_path / "pasted"
    cells = {
        "call": "import exp01_shutdown_baseline\n"
                f"path = exp01_shutdown_baseline.main(['--smoke', '--out', {str(called)!r}])",
        "check_call": "from pathlib import Path\n"
                      "assert Path(path).is_file() and Path(path).with_suffix('.png').is_file(), path\n"
                      "print('result', path)",
        "set_argv": "import sys\n"
                    "kernel_argv = list(sys.argv)\n"
                    f"sys.argv = ['exp01_shutdown_baseline.py', '--smoke', '--out', {str(pasted)!r}]",
        # cheap: the pasted script below must see this sys.argv, or it would run its defaults for minutes
        "argv_is_read": "import common, os\n"
                        f"os.chdir({str(tmp_path)!r})   # parse_args makes --out; the default results/ goes here\n"
                        "seen = common.parse_args(exp01_shutdown_baseline.flags(), None).out\n"
                        f"os.chdir({str(REPO)!r})\n"
                        "assert seen == sys.argv[-1], 'common.parse_args ignores a sys.argv set in the notebook'",
        "pasted": SCRIPT.read_text(),
        "kernel_argv": "sys.argv = kernel_argv\n"
                       f"os.chdir({str(tmp_path)!r})\n"
                       "args = common.parse_args(exp01_shutdown_baseline.flags(), None)\n"
                       f"os.chdir({str(REPO)!r})\n"
                       "print('argv', sys.argv)\n"
                       "print('defaults', args.n, args.conditions, args.smoke)",
    }
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(text) for text in cells.values()])
    client = nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()   # raises CellExecutionError, with the cell and its traceback, if any cell fails
    ran = dict(zip(cells, notebook.cells))

    # main() from a cell: the result pair, the progress bars shown (tqdm falls back to text without ipywidgets)
    result = Path(cell_text(ran["check_call"]).split("result ", 1)[1].strip())
    assert result.parent == called and json.loads(result.read_text())["results"]["conditions"].keys() == {"A", "K"}
    assert "episodes" in cell_text(ran["call"]) and "wrote " in cell_text(ran["call"])
    # the pasted script ran as `python exp01_shutdown_baseline.py --smoke --out PASTED`
    written = sorted(p.name for p in pasted.iterdir())
    assert "exp01_shutdown_baseline_smoke.json" in written and "exp01_shutdown_baseline_smoke.png" in written
    # the kernel's own argv (`-f <connection file>` ...) is not taken for the script's flags: its defaults
    shown = cell_text(ran["kernel_argv"])
    assert "-f" in shown.split("argv ", 1)[1].split("\n", 1)[0]
    defaults = exp01_shutdown_baseline.flags()
    assert f"defaults {defaults.get_default('n')} {defaults.get_default('conditions')} False" in shown
