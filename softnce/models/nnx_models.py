"""Flax NNX models in the trainer: a registered factory that takes ``rngs`` builds an NNX module.

The contract: ``factory(num_classes, *, rngs: nnx.Rngs, **fields) -> nnx.Module``, the module called as
``model(x) -> logits [B, num_classes]`` and switched between training and evaluation with ``.train()``
and ``.eval()`` (Dropout, BatchNorm). Its keyword arguments besides ``rngs`` are config fields, as for a
Linen model. :func:`softnce.models.get_model` wraps it in :class:`NNXModel`, which gives the trainer the
Linen model's interface (``init``, ``apply``) over the module's state, so an NNX model trains, resumes,
evaluates, loads and exports exactly as a Linen one.

Variables: the module's state grouped by variable type into collections of nested dicts with string
keys (a list's index ``0`` becomes ``'0'``): :class:`flax.nnx.Param` -> ``'params'``,
:class:`flax.nnx.BatchStat` -> ``'batch_stats'``, any other variable type -> its name in snake case. The
random-number state (:class:`flax.nnx.RngState`) is no variable: every call builds the module with
``nnx.Rngs(key)`` from the call's ``rngs['dropout']`` (the trainer's per-step, per-device key), so
Dropout is reproducible and resumes exactly.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Union

import jax
from flax import nnx

NAMES = ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats"))


def collection_of(variable_type: type) -> Optional[str]:
    """The collection of an NNX variable type (module docstring); ``None`` for random-number state."""
    if issubclass(variable_type, nnx.RngState):
        return None
    for base, name in NAMES:
        if issubclass(variable_type, base):
            return name
    return re.sub(r"(?<!^)(?=[A-Z])", "_", variable_type.__name__).lower()


def _string_keys(tree: Any) -> Any:
    return {str(k): _string_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _own_keys(template: Any, tree: Any) -> Any:
    """``tree`` (string keys) with the keys of ``template`` (e.g. the integer indices of a list)."""
    if not isinstance(template, dict):
        return tree
    return {k: _own_keys(v, tree[str(k)]) for k, v in template.items()}


class NNXModel:
    """An NNX model factory behind the Linen interface the trainer uses: ``init(rng, x, train=False) ->
    variables`` and ``apply(variables, x, train=..., rngs=..., mutable=...)``.

    Args:
      factory: ``factory(num_classes, *, rngs, **fields) -> nnx.Module``.
      num_classes: ``C``.
      fields: the config's fields of the model.
    """

    def __init__(self, factory: Callable[..., nnx.Module], num_classes: int, fields: dict):
        self.factory, self.num_classes, self.fields = factory, num_classes, dict(fields)

    def build(self, key: jax.Array) -> nnx.Module:
        """The module, its parameters initialised and its random streams seeded from ``key``."""
        return self.factory(self.num_classes, rngs=nnx.Rngs(key), **self.fields)

    @staticmethod
    def _states(module: nnx.Module) -> dict[str, list[nnx.State]]:
        """``{collection: [state of each variable type in it]}`` of ``module``."""
        types = {v.type if isinstance(getattr(v, "type", None), type) else type(v)  # a VariableState's, or the Variable
                 for _, v in nnx.to_flat_state(nnx.state(module))}
        out: dict[str, list[nnx.State]] = {}
        for variable_type in sorted(types, key=lambda t: t.__name__):
            name = collection_of(variable_type)
            if name is not None:
                out.setdefault(name, []).append(nnx.state(module, variable_type))
        return out

    def variables_of(self, module: nnx.Module) -> dict:
        """``{collection: nested dict with string keys}`` of ``module`` (module docstring)."""
        variables: dict = {}
        for name, states in self._states(module).items():
            for state in states:
                variables.setdefault(name, {}).update(_string_keys(nnx.to_pure_dict(state)))
        return variables

    def load(self, module: nnx.Module, variables: dict) -> None:
        """Sets ``module``'s state to ``variables`` (as :meth:`variables_of` gives them)."""
        for name, states in self._states(module).items():
            if name not in variables:
                raise ValueError(f"NNX model: the variables lack the collection {name!r} of the module; "
                                 f"they hold {', '.join(sorted(variables))}.")
            for state in states:
                nnx.replace_by_pure_dict(state, _own_keys(nnx.to_pure_dict(state), variables[name]))
                nnx.update(module, state)

    def init(self, rng: jax.Array, x: Any = None, *, train: bool = False) -> dict:
        """The initial variables of the module built from ``rng`` (``x`` and ``train`` are not needed)."""
        del x, train
        return self.variables_of(self.build(rng))

    def apply(self, variables: dict, x: jax.Array, *, train: bool, rngs: Optional[dict] = None,
              mutable: Union[bool, str, list] = False):
        """``logits``, or ``(logits, {collection: updated variables})`` for the ``mutable`` collections."""
        key = (rngs or {}).get("dropout", jax.random.PRNGKey(0))
        module = self.build(key)  # its fresh parameters are replaced (and the computation of them dropped)
        self.load(module, variables)
        module.train() if train else module.eval()
        logits = module(x)
        if not mutable:
            return logits
        names = [mutable] if isinstance(mutable, str) else list(mutable)
        now = self.variables_of(module)
        return logits, {name: now[name] for name in names}
