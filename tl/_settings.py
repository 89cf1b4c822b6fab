"""How settings dataclasses read and write the flat JSON that stores and models keep.

Feature stores, model folders and run states record settings as one flat JSON object
(`backbone`, `weights`, `image_size`, `layers`, ...). The settings themselves are
nested: `ExtractionSettings` holds a `BackboneSettings` and an `ImageSettings`.
`FlatSettings` maps between the two generically over the dataclass fields, so a field
added to a part (an engine, say) is written, read back, overridden by keyword and
compared without being listed anywhere else. Keys an older tl did not write take the
field's default when read.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any, ClassVar, TypeVar

from tl.errors import TLError

S = TypeVar("S", bound="FlatSettings")


def _plain(value: Any) -> Any:
    """A value as JSON holds it: tuples become lists."""
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


class FlatSettings:
    """Mixin for frozen settings dataclasses stored as one flat JSON object.

    A field whose type is another `FlatSettings` is a part: its keys sit beside the
    owner's own. `JSON_NAMES` maps a field to its key where the two differ
    (`BackboneSettings.name` is stored as `backbone`); keys never collide.
    Validation and normalisation stay in each dataclass's `__post_init__`.
    """

    JSON_NAMES: ClassVar[dict[str, str]] = {}

    @classmethod
    @functools.cache
    def _parts(cls) -> dict[str, type[FlatSettings]]:
        """Field name → settings class, for the fields that are parts."""
        hints = typing.get_type_hints(cls)
        return {
            field.name: hints[field.name]
            for field in dataclasses.fields(cls)
            if isinstance(hints[field.name], type)
            and issubclass(hints[field.name], FlatSettings)
        }

    @classmethod
    def _key(cls, name: str) -> str:
        return cls.JSON_NAMES.get(name, name)

    @classmethod
    @functools.cache
    def json_keys(cls) -> frozenset[str]:
        """Every flat key this class reads and writes, its parts' included."""
        parts = cls._parts()
        keys: set[str] = set()
        for field in dataclasses.fields(cls):
            if field.name in parts:
                keys |= parts[field.name].json_keys()
            else:
                keys.add(cls._key(field.name))
        return frozenset(keys)

    @classmethod
    def json_defaults(cls) -> dict[str, Any]:
        """Every flat key this class reads and writes, with its default (a key whose
        field has no default maps to `dataclasses.MISSING`)."""
        defaults: dict[str, Any] = {}
        parts = cls._parts()
        for field in dataclasses.fields(cls):
            if field.name in parts:
                part = _default(field)
                part_defaults = parts[field.name].json_defaults()
                if part is not dataclasses.MISSING:
                    part_defaults.update(part.to_json())
                defaults.update(part_defaults)
            else:
                defaults[cls._key(field.name)] = _plain(_default(field))
        return defaults

    def to_json(self) -> dict[str, Any]:
        """The settings as one flat dict of JSON values."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in self._parts():
                values.update(value.to_json())
            else:
                values[self._key(field.name)] = _plain(value)
        return values

    @classmethod
    def from_json(cls: type[S], values: dict[str, Any]) -> S:
        """Settings from a flat dict such as `to_json` wrote; keys this class does
        not know are ignored, keys it knows but `values` lacks take their defaults."""
        known = cls.json_keys() | cls._parts().keys()
        return cls._build(None, {k: v for k, v in values.items() if k in known})

    @classmethod
    def create(cls: type[S], **values: Any) -> S:
        """Settings from flat keywords, e.g. `ExtractionSettings.create(
        backbone="vgg16", weights="none", image_size=32, layers=["block5"])`; the
        rest take their defaults. A part may be given whole (`image=ImageSettings(..)`).
        """
        cls._check_keys(values)
        return cls._build(None, values)

    def updated(self: S, **changes: Any) -> S:
        """A copy with `changes`, given as flat keys (or whole parts): the keyword
        overrides of `tl.extract`, `tl.compare` and `tl.fine_tune`."""
        self._check_keys(changes)
        return self._build(self, changes)

    @classmethod
    def with_defaults(cls, values: dict[str, Any]) -> dict[str, Any]:
        """A stored flat dict with the keys an older tl did not write filled in by
        their defaults, so that it compares with what this tl writes."""
        defaults = {
            key: value
            for key, value in cls.json_defaults().items()
            if value is not dataclasses.MISSING
        }
        return {**defaults, **values}

    def check_parts(self) -> None:
        """Refuse a part given as something else (`backbone="vgg16"` to the
        constructor, which takes a `BackboneSettings`): for the owners'
        `__post_init__`."""
        for name, part in self._parts().items():
            value = getattr(self, name)
            if not isinstance(value, part):
                raise TLError(
                    f"{type(self).__name__}'s {name} must be a {part.__name__}, got "
                    f"{value!r}; for flat keys use {type(self).__name__}.create("
                    f"{name}=...) or .updated({name}=...)."
                )

    @classmethod
    def _check_keys(cls, values: dict[str, Any]) -> None:
        known = cls.json_keys() | cls._parts().keys()
        unknown = sorted(set(values) - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TLError(
                f"Unknown setting {', '.join(map(repr, unknown))} of "
                f"{cls.__name__}.{hint} Known settings: {', '.join(sorted(known))}."
            )

    @classmethod
    def _build(cls: type[S], base: S | None, values: dict[str, Any]) -> S:
        """`base` (None: the defaults) with the flat `values` applied."""
        parts = cls._parts()
        arguments = {}
        for field in dataclasses.fields(cls):
            part = parts.get(field.name)
            current = _default(field) if base is None else getattr(base, field.name)
            if part is None:
                key = cls._key(field.name)
                if key in values:
                    arguments[field.name] = values[key]
                elif current is not dataclasses.MISSING:
                    arguments[field.name] = current
                continue
            given = values.get(field.name)
            if isinstance(given, part):
                arguments[field.name] = given
                continue
            own = {k: v for k, v in values.items() if k in part.json_keys()}
            if current is dataclasses.MISSING:
                arguments[field.name] = part._build(None, own)
            else:
                arguments[field.name] = part._build(current, own) if own else current
        return cls(**arguments)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING
