"""The Colab notebooks (colab/): sample.ipynb runs top to bottom on CPU and shows an image grid;
both notebooks are valid, committed without outputs, and every code cell compiles as IPython runs it.

sample.ipynb runs in a real Jupyter kernel (nbclient), from the repository root as Colab runs it from
the clone, against the digits demo's model bundles `<workdir>/{vae,dit}/model` with random weights, of
configs/demo_digits.py's architectures made smaller (tests/bundles.py): the files `ldm-jax demo`
writes, without its minutes of training. Parameters are injected as papermill does, in a cell after
the one tagged "parameters". The install cell runs too: outside Colab it only finds the checkout.
train_small.ipynb trains the demo itself (minutes), so it is only checked statically here.
The install cell's own functions (the SOURCE check, the jax build for the chips) are tested on their own:
each bad SOURCE gets its one-sentence message, without Colab, pip or a network (git clones file:// URLs).
"""
import ast
import base64
import io
import os
import subprocess

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
    assert 'SOURCE = ""  # @param {type:"string"}' in install.source.splitlines(), "SOURCE: a form field, empty"
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


def install_functions(name):
    """The install cell's imports and functions (ldm_jax_checkout, jax_build), without running the cell."""
    (install,) = tagged(read(name), "install")
    tree = ast.parse(TransformerManager().transform_cell(install.source))
    definitions = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
    namespace = {}
    exec(compile(ast.Module(definitions, type_ignores=[]), f"{name}.ipynb install cell", "exec"), namespace)
    return namespace


def test_no_placeholder_repository_url():
    for notebook in sorted((ROOT / "colab").glob("*.ipynb")):
        assert "YOUR_ORG" not in notebook.read_text() and "REPO_URL" not in notebook.read_text(), notebook.name


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_install_cell_finds_the_checkout_or_says_what_is_wrong(name, tmp_path):
    checkout = install_functions(name)["ldm_jax_checkout"]
    # empty SOURCE outside Colab: the checkout the notebook runs in, or the one above colab/ (as before)
    assert os.path.samefile(checkout("", colab=False, cwd=ROOT), ROOT)
    assert os.path.samefile(checkout("  ", colab=False, cwd=ROOT / "colab"), ROOT)
    with pytest.raises(ValueError, match=f"^{tmp_path} is not in an ldm_jax checkout: start Jupyter in one"):
        checkout("", colab=False, cwd=tmp_path)
    # empty SOURCE on Colab
    with pytest.raises(ValueError, match="^set SOURCE to an ldm_jax checkout .* or to a git URL"):
        checkout("", colab=True, cwd=tmp_path)
    # a real checkout, absolute or relative to the working folder (/content on Colab)
    for colab in (False, True):
        assert os.path.samefile(checkout(str(ROOT), colab=colab, cwd=tmp_path), ROOT)
    assert os.path.samefile(checkout(ROOT.name, colab=True, cwd=ROOT.parent), ROOT)
    # folders that are not a checkout: empty, another project's setup.py, ldm_jax's setup.py without the package
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "setup.py").write_text('setup(name="other")\n')
    (tmp_path / "other" / "ldm_jax").mkdir()
    (tmp_path / "other" / "ldm_jax" / "__init__.py").touch()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "setup.py").write_text('setup(name="ldm_jax")\n')
    for folder in (tmp_path, tmp_path / "other", tmp_path / "half", ROOT / "ldm_jax"):
        with pytest.raises(ValueError, match=f"^SOURCE='{folder}' is not an ldm_jax checkout: it needs setup.py"):
            checkout(str(folder), colab=True)
    with pytest.raises(ValueError, match="^SOURCE='github.com/x/ldm_jax' is neither a folder .* nor a git URL"):
        checkout("github.com/x/ldm_jax", colab=True, cwd=tmp_path)


def git_repository(folder, files):
    folder.mkdir()
    for path, text in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "files"]):
        subprocess.run([*git, *command], check=True)
    return folder.as_uri()


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_install_cell_clones_a_git_url_or_shows_gits_message(name, tmp_path):
    checkout = install_functions(name)["ldm_jax_checkout"]
    url = git_repository(tmp_path / "repo", {"setup.py": 'setup(\n    name="ldm_jax",\n)\n', "ldm_jax/__init__.py": ""})
    clone = tmp_path / "content" / "ldm_jax"
    assert checkout(url, "main", colab=True, clone_to=str(clone)) == str(clone)
    assert (clone / "ldm_jax" / "__init__.py").is_file()
    assert checkout(url, "main", colab=True, clone_to=str(clone)) == str(clone)  # a rerun: the same clone
    with pytest.raises(ValueError, match=f"^{clone} already holds {url}, not a clone of SOURCE='{url}x'"):
        checkout(url + "x", colab=True, clone_to=str(clone))

    absent = (tmp_path / "absent.git").as_uri()
    with pytest.raises(ValueError, match=f"^git cannot clone SOURCE='{absent}' \\(BRANCH='main'\\): fatal: .*absent"):
        checkout(absent, "main", colab=True, clone_to=str(tmp_path / "clone1"))
    with pytest.raises(ValueError, match=f"^git cannot clone SOURCE='{url}' \\(BRANCH='nope'\\): .*nope"):
        checkout(url, "nope", colab=True, clone_to=str(tmp_path / "clone2"))
    other = git_repository(tmp_path / "other", {"README.md": "not ldm_jax\n"})
    with pytest.raises(ValueError, match=f"^SOURCE='{other}' is not the ldm_jax repository"):
        checkout(other, "main", colab=True, clone_to=str(tmp_path / "clone3"))
    assert not (tmp_path / "clone3").exists()  # so that the right URL clones there next


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_install_cell_picks_the_jax_build_for_the_chips(name):
    jax_build = install_functions(name)["jax_build"]
    none = lambda pattern: False  # noqa: E731
    assert jax_build({}, none) == "cpu"
    assert jax_build({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, none) == "tpu"
    assert jax_build({"TPU_ACCELERATOR_TYPE": "v2-8"}, none) == "tpu"
    assert jax_build({}, lambda pattern: pattern == "/dev/accel*") == "tpu"
    assert jax_build({}, lambda pattern: pattern.startswith("/dev/vfio/")) == "tpu"
    assert jax_build({}, lambda pattern: pattern == "/dev/nvidia0") == "cuda12"
