"""Unit conversion with pint, built lazily and cached for the hot path.

* The pint ``UnitRegistry`` is created once, on the first conversion that needs it.
* A ``(source, target)`` pair is resolved once into an affine conversion
  ``y = x * scale + offset`` (multiplicative units and offset temperatures such as
  degF → degC); a conversion that is not affine (logarithmic units such as dBm → mW) keeps
  pint's exact function. Resolutions, failures included, live in a bounded LRU cache.
* Unit strings come from devices, so they are screened before they reach pint, whose parser
  evaluates numeric powers (``m^9^9^9`` would hang): parentheses, a power applied to a number
  and a leading number are refused.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import pint

from fleetmesh.telemetry.domain_model import RejectReason

_CACHE_SIZE: Final = 1_024
_MAX_UNIT_LENGTH: Final = 64
_ALLOWED_CHARACTERS: Final = re.compile(r"([^\W\d]|[°µΩ%‰])[\w°µΩ%‰·*/^ .-]*")
_POWER_OF_A_NUMBER: Final = re.compile(r"\d\s*(\^|\*\*)")
_AFFINE_PROBE: Final = 1_000.0


@dataclass(frozen=True, slots=True)
class UnitConversion:
    """A resolved conversion from ``source`` to ``target`` units."""

    source: str
    target: str
    scale: float
    offset: float
    exact: Callable[[float], float] | None = None

    @property
    def is_identity(self) -> bool:
        """True when both strings name the same unit (e.g. ``°C`` and ``degC``)."""
        return self.exact is None and self.scale == 1.0 and self.offset == 0.0

    def convert(self, value: float) -> float:
        if self.exact is not None:
            return self.exact(value)
        return value * self.scale + self.offset


@dataclass(frozen=True, slots=True)
class UnitProblem:
    """Why a conversion cannot be made: ``unit_unknown`` or ``unit_incompatible``."""

    reason: RejectReason
    message: str


@functools.cache
def _registry() -> pint.UnitRegistry[float]:
    return pint.UnitRegistry()


def is_safe_unit_text(unit: str) -> bool:
    """Whether a unit string may be handed to pint's parser."""
    return (
        len(unit) <= _MAX_UNIT_LENGTH
        and _ALLOWED_CHARACTERS.fullmatch(unit) is not None
        and _POWER_OF_A_NUMBER.search(unit) is None
    )


@functools.lru_cache(maxsize=_CACHE_SIZE)
def unit_problem(unit: str) -> UnitProblem | None:
    """``None`` when pint knows the unit, otherwise why not."""
    if not is_safe_unit_text(unit):
        return UnitProblem(RejectReason.UNIT_UNKNOWN, f"{unit!r} is not a unit expression")
    try:
        _registry().parse_units(unit)
    except Exception:  # pint raises a variety of parser errors on arbitrary text
        return UnitProblem(RejectReason.UNIT_UNKNOWN, f"{unit!r} is not a known unit")
    return None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def resolve_conversion(source: str, target: str) -> UnitConversion | UnitProblem:
    """Resolve (once) how to convert values from ``source`` to ``target`` units."""
    problem = unit_problem(source) or unit_problem(target)
    if problem is not None:
        return problem
    exact = _pint_conversion(source, target)
    try:
        at_zero, at_one, at_probe = exact(0.0), exact(1.0), exact(_AFFINE_PROBE)
    except (pint.DimensionalityError, pint.OffsetUnitCalculusError, ArithmeticError):
        message = f"{source!r} cannot be converted to {target!r}"
        return UnitProblem(RejectReason.UNIT_INCOMPATIBLE, message)
    scale = (at_probe - at_zero) / _AFFINE_PROBE
    if math.isclose(at_one, at_zero + scale, rel_tol=1e-9, abs_tol=1e-9):
        return UnitConversion(source, target, _snap(scale, 1.0), _snap(at_zero, 0.0))
    return UnitConversion(source, target, scale, at_zero, exact=exact)


def _pint_conversion(source: str, target: str) -> Callable[[float], float]:
    registry = _registry()
    source_units = registry.parse_units(source)
    target_units = registry.parse_units(target)

    def convert(value: float) -> float:
        return float(registry.Quantity(value, source_units).to(target_units).magnitude)

    return convert


def _snap(value: float, exact: float) -> float:
    """Remove float noise around 1 and 0 so equal units are recognised as such."""
    return exact if math.isclose(value, exact, rel_tol=1e-12, abs_tol=1e-12) else value
