"""kdkit's version, in one place (results and cache keys record it)."""

__version__ = "0.1.0"
