"""kdkit's built-in plugins, installed as ``kdkit_plugins`` and registered through the ``kdkit`` entry-point
group exactly as a third-party plugin is. They use only kdkit's public API."""
