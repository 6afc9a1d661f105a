"""A format's own write options (``Format.options_class``): a frozen dataclass per format, one field per
option, that the command line turns into flags by itself and the resume journal records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, TypeVar

from actfmt.errors import ConversionError

__all__ = ["FormatOptions", "option_flag"]


def option_flag(name: str) -> str:
    """The command-line flag of a format option field: ``zarr_format`` -> ``--zarr-format``."""
    return "--" + name.replace("_", "-")


_O = TypeVar("_O", bound="FormatOptions")


@dataclass(frozen=True)
class FormatOptions:
    """A format's own write options: subclass it as a frozen dataclass (``Format.options_class``), one field
    per option with a default.  The command line makes each field a flag by itself (``zarr_format`` ->
    ``--zarr-format``); a field's ``metadata`` gives its ``help`` and, optionally, its ``choices``.  The object
    serialises itself for the resume journal (:meth:`to_dict`) and for the command that continues a conversion
    (:meth:`flags`).  This base class has no option (the formats without options of their own use it)."""

    @classmethod
    def from_mapping(cls: type[_O], values: Mapping[str, Any] | None, format_name: str) -> _O:
        """The options ``values`` give (``None`` values: not given, the default); a
        :class:`~actfmt.errors.ConversionError` for an option the format does not have or a value not among
        the field's ``choices``."""
        known = {f.name: f for f in fields(cls)}
        given = {k: v for k, v in (values or {}).items() if v is not None}
        for key in given:
            if key not in known:
                have = ", ".join(option_flag(n) for n in known) or "none"
                raise ConversionError(
                    f"{option_flag(key)} is not an option of the {format_name} format (its own options: {have})."
                )
        for key, value in given.items():
            choices = known[key].metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConversionError(
                    f"{option_flag(key)} {value!r} is not available for {format_name}; choose one of: "
                    f"{', '.join(str(c) for c in choices)}."
                )
        return cls(**given)

    @classmethod
    def of(cls: type[_O], options: Any) -> _O:
        """The options of this class a writer was given (``options``: its
        :class:`~actfmt.formats.base.WriteOptions`; the defaults when it was given none)."""
        got = options.format_options
        if isinstance(got, cls):
            return got
        if type(got) is FormatOptions:
            return cls()
        raise TypeError(f"{type(got).__name__} given where {cls.__name__} is expected")

    def to_dict(self) -> dict[str, Any]:
        """Every option's value (the journal records them)."""
        return asdict(self)

    def flags(self) -> list[str]:
        """The command-line options that give these values (options at their default are left out)."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.default is MISSING or value != f.default:
                out.append(f"{option_flag(f.name)} {value}")
        return out
