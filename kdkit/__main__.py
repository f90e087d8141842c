"""``python -m kdkit`` is the ``kdkit`` command."""

from kdkit.cli import main

if __name__ == "__main__":
    main()
