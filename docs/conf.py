"""Sphinx configuration of the Collider documentation."""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("collider-kernels", "collider-autograd", "collider-models")

# Import the packages from the source tree, whether or not they are installed.
for _name in PACKAGES:
    sys.path.insert(0, str(ROOT / "packages" / _name / "src"))


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        with open(ROOT / "packages" / name / "pyproject.toml", "rb") as f:
            versions[name] = tomllib.load(f)["project"]["version"]
    return versions


PACKAGE_VERSIONS = _package_versions()

# -- Project information -------------------------------------------------------------------------

project = "Collider"
author = "The Collider authors"
copyright = "The Collider authors"
# The packages are versioned separately; while they agree, that is the documented version.
if len(set(PACKAGE_VERSIONS.values())) == 1:
    release = next(iter(PACKAGE_VERSIONS.values()))
else:
    release = ", ".join(f"{name} {v}" for name, v in PACKAGE_VERSIONS.items())
version = release

# -- General configuration -----------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]

templates_path: list[str] = []
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
nitpicky = False

# -- autodoc / napoleon --------------------------------------------------------------------------

# GPU backends are optional; the docs build without them.
autodoc_mock_imports = ["triton", "cupy", "cupy_backends"]
autodoc_typehints = "description"
autodoc_typehints_description_target = "all"
autodoc_member_order = "bysource"

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_param = True
napoleon_use_rtype = False

# -- HTML output ---------------------------------------------------------------------------------

html_theme = "alabaster"
html_title = f"Collider {release}"
html_theme_options = {
    "description": "Token-filtered LLM training with a backward over kept tokens only",
    "fixed_sidebar": True,
    # Wider than the default 940 px, still under a 1280-px window; code lines wrap (code_blocks.css).
    "page_width": "1200px",
    "sidebar_width": "220px",
    "body_max_width": "none",  # the basic theme's default 800 px would leave the wider page unused
}
html_static_path = ["_static"]
html_css_files = ["code_blocks.css"]
