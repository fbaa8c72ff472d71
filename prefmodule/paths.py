"""Resolve ``asset://`` references to the files shipped inside the package.

Configs name the tiny demo model and dataset as ``asset://tiny-llama`` or
``asset://demo/train.jsonl`` so they work from any directory and after ``pip install``.
Anything else (a local path or a Hugging Face hub id) passes through unchanged.
"""

from __future__ import annotations

from pathlib import Path

ASSET_SCHEME = "asset://"
ASSETS_DIR = Path(__file__).parent / "assets"


def resolve(name_or_path: str) -> str:
    """Return the real location of ``name_or_path``, expanding ``asset://`` and ``~``."""
    if name_or_path.startswith(ASSET_SCHEME):
        target = ASSETS_DIR / name_or_path[len(ASSET_SCHEME):]
        if not target.exists():
            shipped = sorted(p.name for p in ASSETS_DIR.iterdir()) if ASSETS_DIR.exists() else []
            raise FileNotFoundError(
                f"{name_or_path!r}: no such shipped asset at {target}. Shipped assets: {shipped}. "
                "Rebuild them with `python scripts/build_assets.py`."
            )
        return str(target)
    if name_or_path.startswith("~"):
        return str(Path(name_or_path).expanduser())
    return name_or_path
