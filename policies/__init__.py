"""Policies by name: exit rules, KV policies for skipped layers, confidence measures, thresholds.

Every built-in is one module in this package that registers itself on import. A user's policy
registers the same way from its own module; eesim finds it by a dotted path
(``my_pkg.my_rules.FirstExit``, optionally ``...:key=value,...``) or through the entry-point groups
``eesim.exit_rules`` and ``eesim.kv_policies``.

A spec string is ``name`` or ``name:key=value,key=value``; values are parsed as int, float or text.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any, Callable

from eesim.errors import EesimError
from eesim.kv_policy import KVPolicy
from eesim.policies.base import ExitRule, Measure

EXIT_RULES: dict[str, Callable[..., ExitRule]] = {}
KV_POLICIES: dict[str, KVPolicy] = {}
MEASURES: dict[str, Measure] = {}


def register_exit_rule(cls: type[ExitRule]) -> type[ExitRule]:
    EXIT_RULES[cls.name] = cls
    return cls


def register_kv_policy(policy: KVPolicy) -> KVPolicy:
    KV_POLICIES[policy.name] = policy
    return policy


def register_measure(measure: Measure) -> Measure:
    MEASURES[measure.name] = measure
    return measure


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise EesimError(f"policy spec {spec!r}: expected key=value, got {item!r}")
        params[key.strip()] = _parse_value(value.strip())
    return name.strip(), params


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _load_dotted(path: str, kind: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise EesimError(f"unknown {kind} {path!r}: cannot import module {module_name!r} ({err})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise EesimError(f"unknown {kind} {path!r}: module {module_name!r} has no {attr!r}") from None


def _from_entry_points(group: str, name: str) -> Any | None:
    for ep in entry_points(group=group):
        if ep.name == name:
            return ep.load()
    return None


def _lookup(name: str, registry: dict, group: str, kind: str, example: str) -> Any:
    """A registered name, an entry point of ``group``, or a dotted path to an importable object."""
    found = registry.get(name) or _from_entry_points(group, name)
    if found is None and "." in name:
        found = _load_dotted(name, kind)
    if found is None:
        raise EesimError(f"unknown {kind} {name!r}; built-in: {', '.join(sorted(registry))} "
                         f"(or give a dotted path {example})")
    return found


def exit_rule(spec: str | ExitRule) -> ExitRule:
    """An exit rule from a spec string such as ``all_confident`` or ``quorum:q=0.75``."""
    if isinstance(spec, ExitRule):
        return spec
    name, params = parse_spec(spec)
    factory = _lookup(name, EXIT_RULES, "eesim.exit_rules", "exit rule", "module.Class")
    try:
        rule = factory(**params)
    except TypeError as err:
        raise EesimError(f"exit rule {name!r}: bad parameters {params} ({err})") from None
    if not isinstance(rule, ExitRule):
        raise EesimError(f"exit rule {name!r} is not an eesim.policies.base.ExitRule")
    return rule


def kv_policy(spec: str | KVPolicy) -> KVPolicy:
    if isinstance(spec, KVPolicy):
        return spec
    policy = _lookup(spec, KV_POLICIES, "eesim.kv_policies", "KV policy", "module.POLICY")
    if not isinstance(policy, KVPolicy):
        raise EesimError(f"KV policy {spec!r} is not an eesim.kv_policy.KVPolicy")
    return policy


def measure(name: str | Measure) -> Measure:
    if isinstance(name, Measure):
        return name
    if name not in MEASURES:
        raise EesimError(f"unknown confidence measure {name!r}; choose one of {', '.join(sorted(MEASURES))}")
    return MEASURES[name]


# Import every module of this package so that each built-in registers itself.
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
