"""One registry pattern for everything a config names: losses, models and datasets.

A :class:`Registry` maps a name to an object. The package fills three of them
(:data:`softnce.losses.LOSSES`, :data:`softnce.models.MODELS`, :data:`softnce.data.DATASETS`) through
``register_loss``, ``register_model`` and ``register_dataset``; a user's module adds its own entries
the same way, without editing the package, and ``python -m softnce.main --import_modules=my_module``
imports it before the config is read::

    from softnce import models

    @models.register_model("my_net")
    def my_net(num_classes, **kwargs):
        return MyNet(num_classes=num_classes, **kwargs)

:func:`lazy` makes an entry that imports its module only when it is first called (the datasets use
it, so tensorflow-datasets is imported only by a run that reads a tfds dataset).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar, overload

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind, e.g. ``Registry("loss", "losses")``.

    ``register`` refuses a name that is taken unless ``overwrite=True``; ``get`` of an unknown name
    raises ``ValueError`` listing the valid names, sorted.
    """

    def __init__(self, kind: str, plural: Optional[str] = None):
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str, obj: None = None, *, overwrite: bool = False) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, overwrite: bool = False) -> T: ...

    def register(self, name: str, obj: Optional[T] = None, *, overwrite: bool = False):
        """Registers ``obj`` under ``name`` and returns it; without ``obj``, a decorator that does so."""
        if obj is None:
            return functools.partial(self.register, name, overwrite=overwrite)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}.")
        if name in self._entries and not overwrite:
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered; pass overwrite=True to replace it."
            )
        self._entries[name] = obj
        return obj

    def unregister(self, name: str) -> T:
        """Removes ``name`` (e.g. a test's temporary entry) and returns what it held."""
        self.get(name)
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self.names())}.")
        return self._entries[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def lazy(target: str) -> Callable[..., Any]:
    """A callable standing for ``module:attribute``: the first call imports the module, every call forwards.

    >>> lazy("math:hypot")(3.0, 4.0)
    5.0
    """
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"lazy: target must be 'module:attribute', got {target!r}.")

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module_name), attribute)(*args, **kwargs)

    call.__name__ = attribute
    call.__qualname__ = attribute
    call.__doc__ = f"Imports {module_name} and calls its {attribute} (see softnce.registry.lazy)."
    return call
