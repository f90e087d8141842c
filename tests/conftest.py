"""Shared test set-up. Keep it minimal: several files rely on it."""

import os
import sys
import textwrap

import pytest

# No test may touch a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --------------------------------------------------------------------------- installed-plugin fakes


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """Put a distribution on ``sys.path`` the way pip installs one (a ``.dist-info`` folder with
    ``entry_points.txt``), so that kdkit's real entry-point discovery finds it.

    ``make(dist_name, entry_points={"plugin-name": "module:Class"}, modules={"module": "source"})``; an entry
    point may also name a module that is already imported (e.g. ``f"{__name__}:MyPlugin"`` in a test file).
    Modules written here are dropped from ``sys.modules`` afterwards.
    """
    written: list[str] = []

    def make(dist_name, entry_points, modules=None, version="1.0"):
        root = tmp_path / f"site-{dist_name}"
        root.mkdir()
        for module, source in (modules or {}).items():
            (root / f"{module}.py").write_text(textwrap.dedent(source))
            written.append(module)
        info = root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
        lines = ["[kdkit]", *(f"{name} = {target}" for name, target in entry_points.items())]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(root))
        return root

    yield make
    for module in written:
        sys.modules.pop(module, None)
