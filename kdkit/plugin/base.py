"""What a plugin is: a :class:`Plugin` subclass with a name, a version, an :class:`Options` model and hooks."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Options(BaseModel):
    """Base class of plugin options: a pydantic model that refuses unknown keys (``extra="forbid"``), so that
    a misspelled option in a recipe is an error instead of being ignored. Subclass it::

        class MyOptions(kdkit.Options):
            power: float = Field(1.0, ge=0)
    """

    model_config = ConfigDict(extra="forbid")


class NoOptions(Options):
    """Options model of a plugin that takes none."""


class Plugin:
    """Base class of kdkit plugins (see :mod:`kdkit.plugin.hookspecs` for the hooks).

    Subclasses set ``name``, ``version``, ``Options`` (a pydantic model with ``extra="forbid"``, best a subclass
    of :class:`kdkit.Options`) and, if they implement ``kdkit_teacher_weights``, ``ensembles``: the streams on
    which they set teacher weights. kdkit creates the instance with the validated options: ``self.options``.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0"
    Options: ClassVar[type[BaseModel]] = NoOptions
    ensembles: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def ensembled_streams(self) -> tuple[str, ...]:
        """Streams whose teacher weights this instance claims; override when it depends on the options."""
        return tuple(self.ensembles)

    def __repr__(self) -> str:
        return f"<kdkit plugin {self.name} {self.version}>"
