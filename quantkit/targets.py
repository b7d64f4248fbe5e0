"""Which Linears a recipe quantizes, and with which scheme: patterns over full module names.

Patterns are written as compressed-tensors writes them: ``Linear`` (every quantizable
Linear), ``re:<regex>`` (``re.match`` against the full name, so anchored at its start, as
both compressed-tensors and vLLM match), or an exact full name such as
``model.layers.3.mlp.down_proj``. The names come from whatever lists a model's Linears (today
``quantkit.graph``, the layer graph); nothing here knows a model.

A ``SchemeAssignment`` resolves: a Linear is quantized when it matches ``targets`` and not
``ignore``; its scheme is the last override whose targets match it, else the default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .scheme import Scheme

ANY_LINEAR = "Linear"
REGEX_PREFIX = "re:"


def pattern_error(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid target, or None."""
    if not pattern:
        return "an empty pattern matches nothing"
    if pattern.startswith(REGEX_PREFIX):
        try:
            re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as e:
            return f"'{pattern}' is not a valid regular expression ({e})"
    return None


def check_patterns(patterns: list[str]) -> list[str]:
    """``patterns`` unchanged, or a ValueError saying why the first invalid one is (a recipe
    field's validator)."""
    for p in patterns:
        if (why := pattern_error(p)) is not None:
            raise ValueError(why)
    return patterns


def matches(name: str, pattern: str) -> bool:
    """Whether the full module name ``name`` of a quantizable Linear matches ``pattern``."""
    if pattern == ANY_LINEAR:
        return True
    if pattern.startswith(REGEX_PREFIX):
        return re.match(pattern[len(REGEX_PREFIX):], name) is not None
    return pattern == name


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, p) for p in patterns)


@dataclass(frozen=True)
class Override:
    targets: tuple[str, ...]
    scheme: Scheme


@dataclass(frozen=True)
class SchemeAssignment:
    """The recipe's answer to "how is this Linear quantized?"."""

    default: Scheme
    targets: tuple[str, ...] = (ANY_LINEAR,)
    ignore: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()

    @property
    def schemes(self) -> tuple[Scheme, ...]:
        """Every scheme a Linear may get, default first, without repeats."""
        return tuple(dict.fromkeys([self.default, *(o.scheme for o in self.overrides)]))

    @property
    def uniform(self) -> bool:
        """True when every targeted Linear gets the default scheme and every Linear is targeted."""
        return self.targets == (ANY_LINEAR,) and not self.ignore and len(self.schemes) == 1

    def scheme_for(self, name: str) -> Scheme | None:
        """The scheme of Linear ``name``, or None when it stays in float."""
        if not matches_any(name, self.targets) or matches_any(name, self.ignore):
            return None
        for override in reversed(self.overrides):
            if matches_any(name, override.targets):
                return override.scheme
        return self.default

    def resolve(self, names: Iterable[str]) -> dict[str, Scheme]:
        """The quantized Linears among ``names`` and their schemes."""
        return {n: s for n in names if (s := self.scheme_for(n)) is not None}

    def unmatched(self, names: Sequence[str]) -> list[str]:
        """Patterns (targets, ignore, overrides) that match none of ``names``: likely typos."""
        patterns = [*self.targets, *self.ignore, *(p for o in self.overrides for p in o.targets)]
        return [p for p in dict.fromkeys(patterns) if not any(matches(n, p) for n in names)]


def fused_mismatches(schemes: Mapping[str, Scheme | None], fused_sets: Iterable[Sequence[str]]) -> list[list[str]]:
    """The sets of Linears a server fuses into one matrix (q/k/v, gate/up) whose members
    would get different schemes (None: float). vLLM refuses them: one fused matrix has one
    scheme (compressed_tensors/utils.py ``should_ignore_layer``, and ``_match_fused_layer``
    picks the first shard's scheme for all)."""
    return [list(s) for s in fused_sets if len({schemes.get(n) for n in s}) > 1]
