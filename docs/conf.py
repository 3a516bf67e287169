"""Sphinx configuration of the softnce documentation: the pages (Markdown through myst-parser) and the
API reference (autodoc + napoleon, from the installed package's docstrings).

Build, with warnings as errors::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The package is imported as installed (``pip install -e ".[docs]"``); nothing here edits the import path.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # autodoc imports the TensorFlow data modules

import softnce  # noqa: E402

project = "softnce"
author = "the softnce authors"
copyright = "the softnce authors"
release = softnce.__version__
version = release

extensions = [
    "myst_parser",  # the Markdown pages (method, guides, results)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",  # the table of the package's public names (no generated stub pages)
    "sphinx.ext.napoleon",  # Google-style "Args:" / "Returns:" / "Attributes:" sections
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# Only the pages are sources; the figures (*.png) are images that the pages include.
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**/.ipynb_checkpoints"]

# Markdown: `[results](results.md)` links between pages and `results.md#a-heading` anchors to the
# headings of levels 1 to 3.
myst_heading_anchors = 3
# Links from the pages to files of the repository outside docs/ (BENCHMARKS.md, README.md), which are
# not part of the documentation: their text stays, without a link. Any other missing target is an error.
nitpick_ignore_regex = [("myst", r".*/(BENCHMARKS|README)")]

# API reference.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Config fields:" lists the fields of a ConfigDict argument, formatted like "Args:".
napoleon_custom_sections = [("Config fields", "params_style")]

html_theme = "alabaster"
html_title = f"softnce {release}"


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """NamedTuple fields are documented by their class's "Attributes:" section (napoleon); their
    accessors, which only say "Alias for field number N", would describe them a second time."""
    if what == "class" and (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
