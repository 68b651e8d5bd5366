"""The Colab notebooks (colab/): sample.ipynb runs top to bottom on CPU and shows an image grid;
both notebooks are valid, committed without outputs, and every code cell compiles as IPython runs it.

sample.ipynb runs in a real Jupyter kernel (nbclient), from the repository root as Colab runs it from
the clone, against the digits demo's model bundles `<workdir>/{vae,dit}/model` with random weights, of
configs/demo_digits.py's architectures made smaller (tests/bundles.py): the files `ldm-jax demo`
writes, without its minutes of training. Parameters are injected as papermill does, in a cell after
the one tagged "parameters". The install cell runs too: outside Colab it only finds the checkout.
train_small.ipynb trains the demo itself (minutes), so it is only checked statically here.
"""
import base64
import io

import nbformat
import numpy as np
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from nbclient import NotebookClient
from PIL import Image

from subprocesses import ROOT, load_config
import bundles

NOTEBOOKS = {"sample": ROOT / "colab" / "sample.ipynb", "train_small": ROOT / "colab" / "train_small.ipynb"}
FORM_FIELDS = {
    "sample": ("DIT_CHECKPOINT", "VAE_FOLDER", "DEMO_WORKDIR", "CLASSES", "SAMPLER", "NUM_STEPS", "CFG_SCALE"),
    "train_small": ("WORKDIR", "VAE_STEPS", "DIT_STEPS", "NUM_SAMPLES"),
}


def read(name):
    return nbformat.read(NOTEBOOKS[name], as_version=4)


def tagged(nb, tag):
    return [cell for cell in nb.cells if tag in cell.metadata.get("tags", [])]


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_valid_clean_and_compiles(name):
    nb = read(name)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit notebooks without outputs"
    for cell in code:
        compile(TransformerManager().transform_cell(cell.source), f"{name}.ipynb cell {cell.id}", "exec")
    (install,) = tagged(nb, "install")
    assert 'COLAB = "google.colab" in sys.modules' in install.source and "pip install" in install.source
    (parameters,) = tagged(nb, "parameters")
    fields = {line.split(" = ")[0]: line for line in parameters.source.splitlines() if " = " in line}
    assert all("# @param" in fields.get(field, "") for field in FORM_FIELDS[name]), "Colab form fields"


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
    """Random-weight stand-ins for `ldm-jax demo --workdir=W`'s exports: W/vae/model, W/dit/model."""
    workdir = tmp_path_factory.mktemp("demo")
    config = load_config("demo_digits")
    config.vae_stage.model.update(block_out_channels=(8, 16), norm_num_groups=4)
    config.dit_stage.model.update(hidden_size=32, depth=1)
    bundles.save_vae(workdir / "vae" / "model", config.vae_stage.model, config.vae_stage.data.image_size)
    bundles.save_dit(workdir / "dit" / "model", config.dit_stage.model)
    return workdir


def test_sample_notebook_shows_a_grid_of_the_chosen_classes(demo_workdir, tmp_path):
    nb = read("sample")
    parameters = {
        "DIT_CHECKPOINT": str(tmp_path / "absent.pt"), "VAE_FOLDER": str(tmp_path / "absent"),  # -> the demo
        "DEMO_WORKDIR": str(demo_workdir), "CLASSES": "1, 8", "IMAGES_PER_CLASS": 3, "SAMPLER": "dpm_solver++",
        "NUM_STEPS": 2, "CFG_SCALE": 2.0, "SEED": 5,
    }
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()),
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(nb.cells.index(tagged(nb, "parameters")[0]) + 1, injected)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert f"DiT: {demo_workdir / 'dit' / 'model'}" in printed
    (png,) = [output.data["image/png"] for output in outputs if "image/png" in output.get("data", {})]
    grid = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))))
    zoom = 64 // 16  # 16x16 digits, shown enlarged
    assert grid.shape == (2 * 16 * zoom, 3 * 16 * zoom, 3) and grid.dtype == np.uint8
