"""One registry pattern for everything a config names: losses, models and datasets.

A :class:`Registry` maps a name to an object. The package fills three of them
(:data:`softnce.losses.LOSSES`, :data:`softnce.models.MODELS`, :data:`softnce.data.DATASETS`) through
``register_loss``, ``register_model`` and ``register_dataset``; a user's module adds its own entries
the same way, without editing the package, and ``python -m softnce.main --import_modules=my_module``
imports it before the config is read::

    from softnce import config_checks, models

    @models.register_model("my_net", ranges={"width": config_checks.count(1, "units of the hidden layer")})
    def my_net(num_classes, *, width=64):
        return MyNet(num_classes=num_classes, width=width)

Components declare their own config fields: the keyword arguments of a model factory (``width``:
``config.model.width``) and the keyword-only parameters of a loss (``fn(logits, inputs, *, gamma=2.0)``:
``config.loss.gamma``) are the fields that :func:`softnce.config_checks.check_config` lets through for the
component a config names (:meth:`Registry.fields`); ``ranges`` (:class:`softnce.config_checks.Range`
per field) declares their valid values. A field without a declared range takes any finite number.

:func:`lazy` makes an entry that imports its module only when it is first called (the datasets use
it, so tensorflow-datasets is imported only by a run that reads a tfds dataset).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, Mapping, Optional, TypeVar, overload

if TYPE_CHECKING:
    from softnce.config_checks import Range

T = TypeVar("T")

REQUIRED = inspect.Parameter.empty
"""The default of a field that a component takes without a default (the config must set it)."""


class Registry(Generic[T]):
    """Names -> objects of one kind, e.g. ``Registry("loss", "losses")``.

    ``register`` refuses a name that is taken unless ``overwrite=True``; ``get`` of an unknown name
    raises ``ValueError`` listing the valid names, sorted. ``fields_of(obj)``: the config fields an
    entry takes (:meth:`fields`; without it, none are known).
    """

    def __init__(self, kind: str, plural: Optional[str] = None, *,
                 fields_of: Optional[Callable[[T], Optional[dict[str, Any]]]] = None):
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._entries: dict[str, T] = {}
        self._ranges: dict[str, dict[str, Range]] = {}
        self._fields_of = fields_of

    @overload
    def register(self, name: str, obj: None = None, *, overwrite: bool = False,
                 ranges: Optional[Mapping[str, Range]] = None) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, overwrite: bool = False,
                 ranges: Optional[Mapping[str, Range]] = None) -> T: ...

    def register(self, name: str, obj: Optional[T] = None, *, overwrite: bool = False,
                 ranges: Optional[Mapping[str, Range]] = None):
        """Registers ``obj`` under ``name`` and returns it; without ``obj``, a decorator that does so.

        ``ranges``: ``{field: Range}``, the valid values of the entry's numeric config fields.
        """
        if obj is None:
            return functools.partial(self.register, name, overwrite=overwrite, ranges=ranges)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}.")
        if name in self._entries and not overwrite:
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered; pass overwrite=True to replace it."
            )
        self._entries[name] = obj
        self._ranges[name] = dict(ranges or {})
        return obj

    def unregister(self, name: str) -> T:
        """Removes ``name`` (e.g. a test's temporary entry) and returns what it held."""
        self.get(name)
        self._ranges.pop(name, None)
        return self._entries.pop(name)

    def ranges(self, name: str) -> dict[str, Range]:
        """``{field: Range}`` declared when ``name`` was registered."""
        self.get(name)
        return dict(self._ranges[name])

    def fields(self, name: str) -> Optional[dict[str, Any]]:
        """``{field: default}`` (:data:`REQUIRED` without one) that the entry ``name`` takes as config fields;
        ``None`` when they are not known (then only the declared :meth:`ranges` are)."""
        obj = self.get(name)
        return None if self._fields_of is None else self._fields_of(obj)

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

    def resolve() -> Any:
        return getattr(importlib.import_module(module_name), attribute)

    def call(*args, **kwargs):
        return resolve()(*args, **kwargs)

    call.resolve = resolve  # what keyword_fields inspects
    call.__name__ = attribute
    call.__qualname__ = attribute
    call.__doc__ = f"Imports {module_name} and calls its {attribute} (see softnce.registry.lazy)."
    return call


def parameters_of(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The parameters of calling ``fn``; for a class, those of its ``__init__`` without ``self`` (a metaclass's
    ``__call__``, e.g. Flax NNX's, would hide them)."""
    if isinstance(fn, type):
        return dict(list(inspect.signature(fn.__init__).parameters.items())[1:])
    return dict(inspect.signature(fn).parameters)


def keyword_fields(fn: Callable[..., Any], *, positional: int, keyword_only: bool = False) -> Optional[dict[str, Any]]:
    """``{name: default}`` of the parameters of ``fn`` after its first ``positional`` ones: the config fields
    of a component called as ``fn(*positional_args, **fields)``.

    ``keyword_only``: only the keyword-only parameters (a loss's ``fn(logits, inputs, *, gamma=2.0)``). A
    :func:`lazy` entry is imported and inspected; a class (a Flax Linen module) gives its constructor's
    fields without Flax's ``parent`` and ``name``. ``None`` when ``fn`` takes ``**kwargs`` (any field).

    >>> keyword_fields(lambda n, *, width=64, depth: None, positional=1)
    {'width': 64, 'depth': <class 'inspect._empty'>}
    """
    fn = fn.resolve() if hasattr(fn, "resolve") else fn
    parameters = list(parameters_of(fn).values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    skip = ("parent", "name") if isinstance(fn, type) else ()
    return {p.name: p.default for p in parameters[positional:]
            if p.kind is not inspect.Parameter.VAR_POSITIONAL and p.name not in skip
            and (not keyword_only or p.kind is inspect.Parameter.KEYWORD_ONLY)}
