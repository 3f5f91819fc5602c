"""The research notebooks: each runs top to bottom on the CPU, and each is committed stripped.

Execution: every ``notebooks/*.ipynb`` is copied into a temporary working copy and run there
with nbclient, in a ``python3`` kernel started from *this* interpreter (a kernel spec written
for the test, so a ``python3`` spec installed elsewhere on the machine cannot pick another
environment; the first cell run checks ``sys.executable``). The repository root goes on the
kernel's ``PYTHONPATH``. Any cell error fails the test with the cell's traceback; each cell has
``CELL_TIMEOUT`` seconds. The executed copy is left in pytest's temp folder for inspection.

Needs the test extra's ``nbclient``, ``nbformat``, ``ipykernel`` and ``matplotlib``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell; CI machines are 2 shared cores
ids = [p.stem for p in NOTEBOOKS]


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    for want in ("01_quickstart.ipynb", "02_finetune_lora.ipynb", "03_mxfp4_and_kernels.ipynb"):
        assert want in names, f"notebooks/{want} is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_is_committed_stripped(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} carry outputs or execution counts; strip them "
                       f"(e.g. jupyter nbconvert --clear-output --inplace {path.name})")
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", path.name


def _kernel_manager(spec_root: pathlib.Path):
    """A KernelManager whose ``python3`` kernel is this interpreter (its venv, its packages)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = spec_root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(spec_root / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_runs(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")

    work = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", work)  # a temporary working copy: outputs land there
    nb = nbformat.read(work / path.name, as_version=4)
    probe = nbformat.v4.new_code_cell("import sys; print(sys.executable)")
    nb.cells.insert(0, probe)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["MPLBACKEND"] = "Agg"  # headless; %matplotlib inline still renders figures as PNG outputs

    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path / "jupyter"),
                                     timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(work)}})
    try:
        client.execute(env=env)
    finally:
        nbformat.write(nb, work / f"executed_{path.name}")  # for a look after a failure

    printed = "".join(o.get("text", "") for o in nb.cells[0].outputs).strip()
    assert pathlib.Path(printed) == pathlib.Path(sys.executable), \
        f"kernel ran {printed}, not this interpreter {sys.executable}"
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
    assert images >= 1, f"{path.name} drew no figure"
