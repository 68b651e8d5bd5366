"""Every config field is read by something: a field of `default_config()` whose name the library
never reads (as an attribute, a string key, or the field of a module / dataclass that a section is
passed to whole) fails, so no setting can silently do nothing."""
import io
import pathlib
import token
import tokenize

import pytest

from ldm_jax.config import default_config
from subprocesses import ROOT, load_config_module

LIBRARY = pathlib.Path(__file__).resolve().parents[1] / "ldm_jax"


def _leaf_paths(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaf_paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _read_names(source):
    """The names a module can read a field by: attributes (`x.name`), string literals that are one
    identifier (`x["name"]`, `x.get("name")`), and names declared as fields (`name: int = ...` in a
    class body, `name=` keywords). Comments and docstrings do not count."""
    names = set()
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (token.COMMENT, token.NL, token.NEWLINE, token.INDENT, token.DEDENT)]
    for previous, current, following in zip([None] + tokens[:-1], tokens, tokens[1:] + [None]):
        if current.type == token.NAME:
            if previous is not None and previous.string == ".":
                names.add(current.string)
            elif following is not None and following.string in (":", "="):
                names.add(current.string)
        elif current.type == token.STRING:
            literal = current.string.strip("\"'")
            if literal.isidentifier():
                names.add(literal)
    return names


@pytest.fixture(scope="module")
def library_reads():
    return set().union(*(_read_names(p.read_text()) for p in LIBRARY.rglob("*.py") if p.name != "config.py"))


@pytest.mark.parametrize("name", ["default"] + sorted(p.stem for p in (ROOT / "configs").glob("*.py")))
def test_every_config_field_is_read_by_the_library(name, library_reads):
    config = default_config() if name == "default" else load_config_module(name).get_config()
    unread = [p for p in _leaf_paths(config.to_dict()) if p.rsplit(".", 1)[-1] not in library_reads]
    assert not unread, f"{name}: config fields nothing reads: {unread}"


def test_an_unread_field_is_found():
    source = 'def f(config):\n    """Reads config.documented_only."""\n    return config.sample.seed, c["key_read"]\n'
    names = _read_names(source)
    assert {"sample", "seed", "key_read"} <= names and "documented_only" not in names
