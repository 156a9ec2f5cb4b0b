"""Tools huayu runs for the model in `huayu chat --tools calculator,equation` (MOSS's plugins).

Neither tool evaluates text as Python: `eval` and sympy's `parse_expr`/`sympify` (which call eval
on the text they are given) are never used. An expression is parsed with `ast.parse` (parsing
runs nothing) and only a whitelist of nodes is interpreted, by `_Walker`: number literals, the
operators + - * / // % ** and unary -/+, parentheses, a few named functions and constants, and
for equations names as unknowns (sympy Symbols made here). Anything else (attributes, calls of
other names, subscripts, lambdas, comprehensions, strings...) is refused naming what it is. Sizes
are bounded: the text to MAX_CHARS, a power by the digits its result would have (MAX_DIGITS),
an unknown's power by MAX_DEGREE; so a request cannot run for long or fill the memory.
docs/tools.md says more.
"""

from __future__ import annotations

import ast
import math
import operator
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from huayu.errors import HuayuError

MAX_CHARS = 200
MAX_DIGITS = 1000     # a result of more digits is refused (10**10**9 would take minutes and gigabytes)
MAX_EXPONENT = 10000  # beyond it only 0, 1 and -1 have a small power
MAX_DEGREE = 12       # of an unknown's power: higher polynomials take sympy long to solve
LIMIT = 10 ** MAX_DIGITS

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class ToolInputError(HuayuError):
    """Arguments a tool refuses; the message is what the model (and the user) are told."""


@dataclass(frozen=True)
class Plugin:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments
    run: Callable[[dict], str]

    def schema(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def _parse(text: str) -> ast.expr:
    """The expression tree of `text` (full-width characters, × and ÷ read as their ASCII forms)."""
    text = unicodedata.normalize("NFKC", text).replace("×", "*").replace("÷", "/").strip()
    if len(text) > MAX_CHARS:
        raise ToolInputError(f"the expression is longer than {MAX_CHARS} characters")
    try:
        return ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise ToolInputError(f"not an arithmetic expression ({exc.msg}): {text}") from None


def _magnitude(value) -> float:
    try:
        return abs(float(value))
    except OverflowError:  # an int beyond float's range
        return math.inf


class _Walker:
    """Interprets a whitelisted expression tree. Subclasses give the leaves their values: `number`,
    `names` (constants), `functions`, and `unknown` for any other name."""

    names: dict = {}
    functions: dict = {}

    def number(self, value):
        return value

    def unknown(self, name: str):
        raise ToolInputError(f"unknown name {name!r}; known: {', '.join(sorted(self.names) + sorted(self.functions))}")

    def check(self, value):
        return value

    def check_power(self, base, exponent) -> None:
        """Refuse a power whose result would have more than MAX_DIGITS digits."""
        b, e = _magnitude(base), _magnitude(exponent)
        if b not in (0.0, 1.0) and (e > MAX_EXPONENT or (b > 1 and e * math.log10(b) > MAX_DIGITS)):
            raise ToolInputError(f"the power {base}**{exponent} is out of range (more than {MAX_DIGITS} digits)")

    def __call__(self, node: ast.expr):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return self.check(self.number(node.value))
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
            return UNARY[type(node.op)](self(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            left, right = self(node.left), self(node.right)
            if isinstance(node.op, ast.Pow):
                self.check_power(left, right)
            try:
                return self.check(BINARY[type(node.op)](left, right))
            except ZeroDivisionError:
                raise ToolInputError("division by zero") from None
            except OverflowError:
                raise ToolInputError("the result is too large") from None
        if isinstance(node, ast.Name):
            return self.names[node.id] if node.id in self.names else self.unknown(node.id)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in self.functions \
                and not node.keywords:
            return self.call(node.func.id, [self(arg) for arg in node.args])
        raise ToolInputError(f"not allowed: {_describe(node)} in {ast.unparse(node)[:60]!r} (only numbers, "
                             f"+ - * / // % **, parentheses and {', '.join(sorted(self.functions))})")

    def call(self, name: str, args: list):
        try:
            return self.check(self.functions[name](*args))
        except TypeError:
            raise ToolInputError(f"{name}() does not take {len(args)} argument(s)") from None
        except (ValueError, OverflowError) as exc:  # math domain errors, exp(1000)
            raise ToolInputError(f"{name}: {exc}") from None


def _describe(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        return f"calling {ast.unparse(node.func)}()"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        return "^ (write a power as **)"
    kinds = {ast.Attribute: "attribute access", ast.Subscript: "indexing", ast.Lambda: "lambda",
             ast.Constant: "a literal that is not a number", ast.Compare: "a comparison"}
    return kinds.get(type(node), f"{type(node).__name__} syntax")


class _Calculator(_Walker):
    names = {"pi": math.pi, "e": math.e}
    functions = {"abs": abs, "round": round, "sqrt": math.sqrt, "exp": math.exp, "log": math.log,
                 "log10": math.log10, "sin": math.sin, "cos": math.cos, "tan": math.tan}

    def check(self, value):
        if isinstance(value, complex):
            raise ToolInputError("the result is not a real number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ToolInputError("the result is too large")
        if isinstance(value, int) and abs(value) >= LIMIT:
            raise ToolInputError(f"the result has more than {MAX_DIGITS} digits")
        return value


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, as text: '19', '3.5', '0.333333333333'."""
    value = _Calculator()(_parse(expression))
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(value, ".12g") if isinstance(value, float) else str(value)


class _Algebra(_Walker):
    """Expressions as sympy objects: numbers exact (0.5 is 1/2), other names unknowns."""

    def __init__(self):
        import sympy

        self.sympy = sympy
        self.names = {"pi": sympy.pi, "e": sympy.E}
        self.functions = {"abs": sympy.Abs, "sqrt": sympy.sqrt, "exp": sympy.exp, "log": sympy.log,
                          "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan}

    def number(self, value):
        from fractions import Fraction

        if not math.isfinite(value):
            raise ToolInputError("the number is too large")
        exact = Fraction(repr(value))  # the decimal as written, not the binary float nearest to it
        return self.sympy.Rational(exact.numerator, exact.denominator)

    def unknown(self, name: str):
        if name.startswith("_") or len(name) > 16:
            raise ToolInputError(f"not allowed as an unknown: {name!r}")
        return self.sympy.Symbol(name)

    def check_power(self, base, exponent) -> None:
        if not exponent.is_number:  # 2**x: sympy keeps it symbolic
            return
        if base.is_number:
            super().check_power(base, exponent)
        elif abs(exponent) > MAX_DEGREE:
            raise ToolInputError(f"the power {base}**{exponent} is too high (at most {MAX_DEGREE})")


def solve_equation(equation: str) -> str:
    """The solutions of an equation in one unknown ("x**2-4=0", or an expression meaning "= 0"):
    'x = -2, x = 2'."""
    sides = equation.replace("==", "=").split("=")
    if len(sides) > 2:
        raise ToolInputError("expected one equation with one '='")
    algebra = _Algebra()
    lhs, rhs = algebra(_parse(sides[0])), algebra(_parse(sides[1])) if len(sides) == 2 else 0
    expression = lhs - rhs
    unknowns = sorted(expression.free_symbols, key=str)
    if len(unknowns) != 1:
        raise ToolInputError(f"expected an equation in one unknown, got {len(unknowns)}: "
                             f"{', '.join(map(str, unknowns)) or 'none'}")
    (x,) = unknowns
    try:
        solutions = algebra.sympy.solve(expression, x)
    except NotImplementedError:
        raise ToolInputError(f"sympy cannot solve {equation}") from None
    return ", ".join(f"{x} = {s}" for s in solutions) if solutions else f"no solution for {x}"


def _text_argument(arguments: dict, key: str) -> str:
    value = arguments.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ToolInputError(f"expected the argument {key!r} as text, got {value!r}")
    return value


PLUGINS = {p.name: p for p in (
    Plugin("calculator", "计算算术表达式",
           {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
           lambda arguments: calculate(_text_argument(arguments, "expression"))),
    Plugin("equation", "解一元方程",
           {"type": "object", "properties": {"equation": {"type": "string"}}, "required": ["equation"]},
           lambda arguments: solve_equation(_text_argument(arguments, "equation"))),
)}


def select_plugins(names: str | None) -> dict[str, Plugin]:
    """The plugins of `--tools a,b` (none for None)."""
    chosen = [n.strip() for n in (names or "").split(",") if n.strip()]
    unknown = [n for n in chosen if n not in PLUGINS]
    if unknown:
        raise HuayuError(f"--tools: unknown tool(s) {', '.join(unknown)}; available: {', '.join(PLUGINS)}")
    return {n: PLUGINS[n] for n in chosen}


def run_call(call: dict, plugins: dict[str, Plugin]) -> str:
    """A call's result as the model is told it: the tool's answer, or why there is none."""
    plugin = plugins.get(call["name"])
    if plugin is None:
        return f"error: no tool named {call['name']!r}; available: {', '.join(plugins)}"
    try:
        return plugin.run(call["arguments"])
    except ToolInputError as exc:
        return f"error: {exc}"
