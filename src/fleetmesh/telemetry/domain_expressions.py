"""Safe arithmetic expressions for derived metrics, evaluated with ``simpleeval``.

An expression is checked once, when the transform spec is built: it must parse, and only
numbers, metric names, arithmetic (``+ - * / // % **``), comparisons, ``and``/``or``/``not``,
``a if cond else b`` and calls of the whitelisted functions below are allowed. Evaluation goes
through simpleeval (no attribute access, no builtins), never ``eval()``; powers are computed
in floating point (``math.pow``) so no expression can build a huge integer.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import simpleeval  # type: ignore[import-untyped]

MAX_EXPRESSION_LENGTH: Final = 512

FUNCTIONS: Final[Mapping[str, Callable[..., float]]] = {
    "abs": abs,
    "min": min,
    "max": max,
    "round": round,
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": math.log,
    "log10": math.log10,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "atan2": math.atan2,
    "hypot": math.hypot,
    "floor": math.floor,
    "ceil": math.ceil,
}

_ALLOWED_NODES: Final = (
    ast.Expression,
    ast.Expr,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.IfExp,
    ast.Call,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.USub,
    ast.UAdd,
    ast.Not,
    ast.And,
    ast.Or,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
)

_EVALUATION_ERRORS: Final = (
    ArithmeticError,
    ValueError,
    TypeError,
    simpleeval.InvalidExpression,
)


class ExpressionError(ValueError):
    """An expression is not allowed (raised when it is parsed)."""


class EvaluationError(ValueError):
    """An allowed expression failed on given values (e.g. division by zero)."""


@dataclass(frozen=True, slots=True)
class Expression:
    """A checked expression; ``inputs`` are the metric names it reads."""

    source: str
    inputs: frozenset[str]
    tree: ast.expr = field(compare=False, repr=False)

    @classmethod
    def parse(cls, source: str) -> Expression:
        tree = _parse_tree(source)
        _check_allowed(tree)
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        called = {
            node.func.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        }
        return cls(source=source, inputs=frozenset(names - called), tree=tree)


class Evaluator:
    """Evaluates expressions; build one per batch (it is not meant to be shared by threads)."""

    __slots__ = ("_engine",)

    def __init__(self) -> None:
        operators = {**simpleeval.DEFAULT_OPERATORS, ast.Pow: math.pow}
        self._engine = simpleeval.SimpleEval(operators, dict(FUNCTIONS), {})

    def evaluate(self, expression: Expression, values: Mapping[str, float]) -> float:
        self._engine.names = values
        try:
            result: object = self._engine.eval(expression.source, previously_parsed=expression.tree)
        except _EVALUATION_ERRORS as exc:
            raise EvaluationError(f"{expression.source!r} failed: {exc}") from None
        if isinstance(result, bool) or not isinstance(result, int | float):
            raise EvaluationError(f"{expression.source!r} did not give a number")
        try:
            number = float(result)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise EvaluationError(f"{expression.source!r} gave a number out of range")
        return number


def _parse_tree(source: str) -> ast.expr:
    if not isinstance(source, str) or not source.strip():
        raise ExpressionError("must be a non-empty string")
    if len(source) > MAX_EXPRESSION_LENGTH:
        raise ExpressionError(f"is longer than {MAX_EXPRESSION_LENGTH} characters")
    try:
        module = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"is not a valid expression: {exc.msg}") from None
    return module.body


def _check_allowed(tree: ast.expr) -> None:
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ExpressionError(f"{type(node).__name__} is not allowed in an expression")
        if isinstance(node, ast.Constant) and not _is_number(node.value):
            raise ExpressionError(f"only numeric constants are allowed, not {node.value!r}")
        if isinstance(node, ast.Call):
            _check_call(node)
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            raise ExpressionError(f"name {node.id!r} is not allowed")


def _check_call(node: ast.Call) -> None:
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        allowed = ", ".join(sorted(FUNCTIONS))
        raise ExpressionError(f"only these functions may be called: {allowed}")
    if node.keywords:
        raise ExpressionError("keyword arguments are not allowed")
    if not node.args:
        raise ExpressionError(f"{node.func.id}() needs at least one argument")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
