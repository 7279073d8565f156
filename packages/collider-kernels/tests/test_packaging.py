"""What installing the package alone relies on: its declared dependencies, its out-of-tree build
backend and its README's install instructions and op table."""

import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_dependencies_and_extras():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = {d.split(">")[0].split("=")[0].strip() for d in meta["project"]["dependencies"]}
    assert deps == {"torch", "numpy"}  # numpy: torch warns at import without it
    assert set(meta["project"]["optional-dependencies"]) == {"triton", "cupy"}
    # hatchling writes the wheel from src/ without build/ or *.egg-info folders in the tree.
    assert meta["build-system"]["build-backend"] == "hatchling.build"
    assert meta["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["src/collider_kernels"]


def test_readme_says_how_to_install_for_cpu_and_cuda_and_gives_every_op():
    import collider_kernels as ck

    readme = (ROOT / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert '"packages/collider-kernels[triton]"' in readme and "[triton,cupy]" in readme
    for op in ck.registered_ops():
        assert f"| `{op}(" in readme, op
    assert "lse" in readme and "_scaled_dot_product_flash_attention" in readme
