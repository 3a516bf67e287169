"""Validation of every numeric config field before any work starts.

``check_config(config, components=...)`` walks the config and checks each numeric leaf (int, float,
and the entries of numeric tuples such as ``model.hidden_sizes``) against its rule: :data:`RULES`
(the base config's fields, keyed by dotted path) or, in the section of a registered component that
the config names (:class:`Component`: the loss, the model, the dataset), the ranges declared when it
was registered; a field that the component takes without a declared range may be any finite number.
A value outside its range raises one ``ValueError`` that names the field, its value and the valid
range, e.g.::

    config.optim.base_lr = -1 is out of range: must be > 0 (the peak learning rate per 256 examples).

A field that the named component does not take (a typo) is one line that lists those it takes. A
numeric field without a rule is an error too, so no number reaches the trainer unchecked; code that
takes such a value outside a config checks it with :func:`check_field` against the same rule.
``None`` means "off" wherever a rule allows it. Relations between fields (warm-up shorter than
training, ``min_lr <= base_lr``) are checked after the per-field ranges.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

from softnce.registry import REQUIRED

if TYPE_CHECKING:  # the rules need no ml_collections: softnce.targets (light core) checks MixConfig here
    import ml_collections


class ConfigError(ValueError):
    """A config that cannot run; the command line prints its one-line message and exits with code 2."""


@dataclasses.dataclass(frozen=True)
class Range:
    """A valid interval ``(low, high)`` with open/closed ends, integrality and optional ``None``."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    allow_none: bool = False
    meaning: str = ""

    def contains(self, value: Any) -> bool:
        if value is None:
            return self.allow_none
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value) or (self.integer and value != int(value)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.high == math.inf and self.low == -math.inf:
            bound = "(finite)"
        elif self.high == math.inf:
            bound = f"{'>' if self.low_open else '>='} {_fmt(self.low)}"
        elif self.low == -math.inf:
            bound = f"{'<' if self.high_open else '<='} {_fmt(self.high)}"
        else:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            bound = f"in {left}{_fmt(self.low)}, {_fmt(self.high)}{right}"
        text = f"must be {kind} {bound}" + (" or None" if self.allow_none else "")
        return text + (f" ({self.meaning})" if self.meaning else "")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def positive(meaning: str = "", **kw) -> Range:
    return Range(0, low_open=True, meaning=meaning, **kw)


def non_negative(meaning: str = "", **kw) -> Range:
    return Range(0, meaning=meaning, **kw)


def count(minimum: int = 1, meaning: str = "", **kw) -> Range:
    return Range(minimum, integer=True, meaning=meaning, **kw)


def probability(meaning: str = "", **kw) -> Range:
    return Range(0, 1, meaning=meaning, **kw)


def fraction_below_one(meaning: str = "", **kw) -> Range:
    return Range(0, 1, high_open=True, meaning=meaning, **kw)


RULES: dict[str, Range] = {
    # The run.
    "seed": count(0, "the run's random seed"),
    "num_train_steps": count(1, "optimiser steps in the whole run"),
    "log_every_steps": count(1, "steps between progress lines"),
    "eval_every_steps": count(1, "steps between evaluations"),
    "validation_every_steps": count(1, "steps between validation evaluations; None = off", allow_none=True),
    "checkpoint_every_steps": count(1, "steps between checkpoints"),
    "max_checkpoints": count(1, "checkpoints kept on disk"),
    "step_timeout_s": positive(
        "seconds without a finished train step before the watchdog exits; None = automatic", allow_none=True
    ),
    "max_steps_in_flight": count(
        1, "train steps dispatched ahead of the host; None = 1 on CPU, 2 on accelerators", allow_none=True
    ),
    # Data.
    "data.batch_size": count(1, "the global training batch"),
    "data.eval_batch_size": count(1, "the global evaluation batch"),
    "data.validation_fraction": fraction_below_one("share of the training data held out to fit the temperature"),
    "data.validation_seed": count(0, "seed of the validation split"),
    "data.seed": count(0, "seed of the generated data"),
    "data.num_train": count(1, "generated training examples"),
    "data.num_val": count(1, "generated validation examples"),
    "data.num_test": count(1, "generated test examples"),
    "data.annotators": count(1, "annotators per example (or 'inf')"),
    "data.image_size": count(8, "side of the square crop in pixels"),
    "data.num_train_examples": count(1, "training examples to read (None = the whole split)", allow_none=True),
    "data.random_crop_padding": count(0, "pixels of padding around the random training crop; 0 = off"),
    "data.num_eval_examples": count(1, "evaluation examples to read (None = the whole split)", allow_none=True),
    "data.random_erasing_prob": probability("probability of random erasing"),
    "data.host_threads": count(1, "Grain threads decoding and cropping images (None = one per core)", allow_none=True),
    "data.num_classes": count(1, "classes of a dataset read from files (None = from the files)", allow_none=True),
    "data.tuple_size": count(1, "Fashion-MNIST images per tuple, k: C = 10^k classes", high=3),
    "data.pool_size": count(1, "side of the average-pooling window of each 28x28 image; 1 = none", high=28),
    # The model's fields are its factory's keyword arguments, with the ranges of its registration
    # (softnce.models), and so are the teacher model's (distill.teacher_model).
    # Loss.
    "loss.temperature": positive("the loss temperature t in z / t"),
    "loss.prior_smoothing": non_negative("pseudo-count added to every class for the noise distribution"),
    "loss.noise_probs": positive("the explicit noise distribution eta of noise='explicit'; None = off",
                                 allow_none=True),
    # Soft targets.
    "augment.label_smoothing": fraction_below_one("label smoothing epsilon"),
    "augment.mixup_alpha": non_negative("Beta(alpha, alpha) of MixUp; 0 = off"),
    "augment.cutmix_alpha": non_negative("Beta(alpha, alpha) of CutMix; 0 = off"),
    "augment.mix_prob": probability("probability that a batch is mixed"),
    "augment.switch_prob": probability("probability of CutMix instead of MixUp"),
    "augment.cutmix_minmax": probability("CutMix box side fractions (lo, hi) of H and W; None = off", allow_none=True),
    # Knowledge distillation (softnce.distill).
    "distill.teacher_step": count(0, "the teacher's checkpoint step (None = its latest)", allow_none=True),
    "distill.tau": positive("the teacher temperature tau in softmax(z_teacher / tau)"),
    "distill.beta": probability("weight of the teacher's distribution in the targets"),
    # Optimiser.
    "optim.base_lr": positive("the peak learning rate per 256 examples"),
    "optim.min_lr": non_negative("the final learning rate of the cosine"),
    "optim.warmup_steps": count(0, "linear warm-up steps"),
    "optim.b1": fraction_below_one("Adam's first-moment decay"),
    "optim.b2": fraction_below_one("Adam's second-moment decay"),
    "optim.weight_decay": non_negative("decoupled weight decay"),
    "optim.grad_clip_norm": positive("global gradient-norm clip; None = off", allow_none=True),
    "optim.layer_decay": Range(0, 1, low_open=True, allow_none=True, meaning="layer-wise lr decay; None = off"),
}


@dataclasses.dataclass(frozen=True)
class Component:
    """The registered component that a config section names, and the fields it takes.

    ``section``: the section's dotted path (``'loss'``, ``'model'``, ``'distill.teacher_model'``, ``'data'``);
    ``kind`` and ``name``: the registry and the entry (``'loss'``, ``'focal'``); ``fields``: ``{field: default}``
    that the component takes (:meth:`softnce.registry.Registry.fields`), ``None`` when not known (a dataset
    reads its whole section); ``ranges``: ``{field: Range}`` declared at registration; ``shared``: the fields
    of the section that the base config gives every component of the kind (``loss.temperature``), with
    their rules in :data:`RULES`.
    """

    section: str
    kind: str
    name: str
    fields: Optional[Mapping[str, Any]]
    ranges: Mapping[str, Range]
    shared: tuple[str, ...] = ("name",)

    def owns(self, path: str) -> Optional[str]:
        """The field of ``path`` when it lies directly in this section (``'loss.gamma'`` -> ``'gamma'``)."""
        head, _, key = path.rpartition(".")
        return key if head == self.section and key not in self.shared else None

    def takes(self) -> list[str]:
        """The fields it takes, sorted: its own and the shared ones."""
        return sorted({*self.shared, *(self.fields or {}), *self.ranges})


def _rule(path: str, rules: Mapping[str, Range], components: Sequence[Component]) -> Optional[Range]:
    """The rule of ``path``: a component's declared range, else :data:`RULES`, else any finite number for a
    field that the component takes; ``None`` if it has none."""
    for component in components:
        key = component.owns(path)
        if key is None:
            continue
        if key in component.ranges:
            return component.ranges[key]
        if path in rules:
            return rules[path]
        if component.fields is not None and key in component.fields:
            return Range(meaning=f"a field of {component.kind} {component.name!r}")
        return None
    return rules.get(path)


def numeric_leaves(config: Any, prefix: str = "", has_rule: Callable[[str], bool] = lambda path: False
                   ) -> Iterator[tuple[str, Any]]:
    """``(dotted path, value)`` of every numeric leaf (and every entry of a numeric tuple/list), and of each
    ``None`` leaf for which ``has_rule(path)``."""
    items = config.items() if _is_mapping(config) else ()
    for key, value in items:
        path = f"{prefix}{key}"
        if _is_mapping(value):
            yield from numeric_leaves(value, path + ".", has_rule)
        elif isinstance(value, (tuple, list)):
            for entry in value:
                if _is_number(entry):
                    yield path, entry
        elif _is_number(value) or (value is None and has_rule(path)):
            yield path, value


def _is_mapping(value: Any) -> bool:
    """A dict, a ``Mapping`` or an ``ml_collections.ConfigDict`` (which has ``items`` but is no ``Mapping``)."""
    return isinstance(value, Mapping) or (hasattr(value, "items") and hasattr(value, "to_dict"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def section_of(config: Any, path: str) -> Any:
    """``config``'s section at the dotted ``path`` (``'distill.teacher_model'``), or ``None`` if it has none."""
    for key in path.split("."):
        config = config.get(key) if _is_mapping(config) else None
    return config


def _check_component_fields(config: Any, component: Component) -> None:
    """Every field in ``component``'s section is one it takes (when its fields are known)."""
    section = section_of(config, component.section)
    if component.fields is None or not _is_mapping(section):
        return
    for key in section.keys():
        if key not in component.shared and key not in component.fields and key not in component.ranges:
            close = difflib.get_close_matches(key, component.takes(), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"config.{component.section}.{key}: {component.kind} {component.name!r} takes no field {key!r}"
                f"{hint}; its fields: {', '.join(component.takes())}."
            )
    missing = [k for k, default in component.fields.items() if default is REQUIRED and k not in section]
    if missing:
        raise ConfigError(f"config.{component.section} needs {', '.join(missing)}: {component.kind} "
                          f"{component.name!r} takes {'it' if len(missing) == 1 else 'them'} without a default.")


def check_config(config: ml_collections.ConfigDict, rules: Optional[Mapping[str, Range]] = None,
                 components: Sequence[Component] = ()) -> None:
    """Raises :class:`ConfigError` (one line) at the first field that the named ``components`` do not take or
    the first numeric field outside its valid range (:data:`RULES` and the components' declared ranges)."""
    rules = RULES if rules is None else rules
    for component in components:
        _check_component_fields(config, component)
    for path, value in numeric_leaves(config, has_rule=lambda path: _rule(path, rules, components) is not None):
        rule = _rule(path, rules, components)
        if rule is None:
            owner = next((c for c in components if c.owns(path)), None)
            where = (f"declare its range when registering {owner.kind} {owner.name!r} "
                     f"(register_{owner.kind}(..., ranges={{{path.rpartition('.')[2]!r}: ...}}))"
                     if owner is not None else "add one to softnce.config_checks.RULES")
            raise ConfigError(f"config.{path} = {value!r} has no validity rule; {where}.")
        check_field(path, value, {path: rule})
    _check_relations(config)


def check_field(path: str, value: Any, rules: Optional[Mapping[str, Range]] = None) -> None:
    """Raises :class:`ConfigError` unless ``value`` is in the range of ``rules[path]`` (:data:`RULES`).

    The one check of a field: code that takes the value outside a config (``MixConfig``,
    ``carve_validation``, the image pipeline) calls this rather than restating the range.
    """
    rule = (RULES if rules is None else rules)[path]
    if not rule.contains(value):
        raise ConfigError(f"config.{path} = {value!r} is out of range: {rule.describe()}.")


def _check_relations(config: ml_collections.ConfigDict) -> None:
    optim, steps = config.get("optim"), config.get("num_train_steps")
    if optim is not None and steps is not None and optim.get("warmup_steps", 0) >= steps:
        raise ConfigError(
            f"config.optim.warmup_steps = {optim.warmup_steps} is out of range: must be < config.num_train_steps "
            f"= {steps} (the warm-up must end before training does)."
        )
    if optim is not None and optim.get("min_lr", 0) > optim.get("base_lr", math.inf):
        raise ConfigError(
            f"config.optim.min_lr = {optim.min_lr} is out of range: must be <= config.optim.base_lr = {optim.base_lr}."
        )
