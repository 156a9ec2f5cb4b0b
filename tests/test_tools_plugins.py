"""The chat plugins: the calculator and the equation solver compute without eval, refuse whatever is
not arithmetic naming it, and bound the sizes a request could blow up."""

import time

import pytest

from huayu.errors import HuayuError
from huayu.plugins import PLUGINS, ToolInputError, calculate, run_call, select_plugins, solve_equation


@pytest.mark.parametrize("expression, value", [
    ("12+7", "19"), ("7/2", "3.5"), ("1/3", "0.333333333333"), ("-3**2", "-9"), ("(1+2)*3", "9"),
    ("10//3", "3"), ("10%3", "1"), ("2**10", "1024"), ("sqrt(16)", "4"), ("round(2.567, 2)", "2.57"),
    ("2*pi", "6.28318530718"), ("12×3÷4", "9"), ("（１+２）*３", "9"), ("2**3000", str(2 ** 3000)),
])
def test_calculator(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, reason", [
    ("__import__('os').system('ls')", "not allowed: calling __import__()"),
    ("().__class__.__bases__", "not allowed: attribute access"),
    ("abs.__doc__", "not allowed: attribute access"),
    ("open('/etc/passwd')", "not allowed: calling open()"),
    ("(lambda: 1)()", "not allowed: calling (lambda: 1)()"),
    ("lambda: 1", "not allowed: lambda"),
    ("[1, 2][0]", "not allowed: indexing"),
    ("'1' + '2'", "not allowed: a literal that is not a number"),
    ("True + 1", "not allowed: a literal that is not a number"),
    ("1 < 2", "not allowed: a comparison"),
    ("[x for x in ()]", "not allowed: ListComp syntax"),
    ("x + 1", "unknown name 'x'"),
    ("2^3", r"\^ \(write a power as \*\*\)"),
    ("import os", "not an arithmetic expression"),
    ("1; 2", "not an arithmetic expression"),
    ("9**9**9", r"the power 9\*\*387420489 is out of range"),
    ("10**1001", "out of range"),
    ("(10**999)*(10**999)", "more than 1000 digits"),
    ("1e999", "too large"),
    ("exp(1000)", "exp: math range error"),
    ("1/0", "division by zero"),
    ("(-8)**(1/3)", "not a real number"),
    ("sqrt(-1)", "sqrt: math domain error"),
    ("sqrt(1, 2)", r"sqrt\(\) does not take 2 argument"),
    ("1+" * 120 + "1", "longer than 200 characters"),
])
def test_calculator_refuses(expression, reason):
    started = time.monotonic()
    with pytest.raises(ToolInputError, match=reason):
        calculate(expression)
    assert time.monotonic() - started < 1  # refused before any long computation


@pytest.mark.parametrize("equation, solutions", [
    ("x**2-4=0", "x = -2, x = 2"), ("x**2 = 4", "x = -2, x = 2"), ("2*y+1", "y = -1/2"), ("0.5*x=1", "x = 2"),
    ("2**x=8", "x = 3"), ("x**2+1=0", "x = -I, x = I"), ("exp(x) = 0", "no solution for x"),
])
def test_equation_solver(equation, solutions):
    assert solve_equation(equation) == solutions


@pytest.mark.parametrize("equation, reason", [
    ("__import__('os').system('ls') = 0", "not allowed: calling __import__()"),
    ("x.__class__ = 1", "not allowed: attribute access"),
    ("_x = 1", "not allowed as an unknown: '_x'"),
    ("x**100 = 1", r"the power x\*\*100 is too high \(at most 12\)"),
    ("2**(10**9) = x", "out of range"),
    ("x + y = 1", "one unknown, got 2: x, y"),
    ("1 = 2", "one unknown, got 0"),
    ("x = 1 = 2", "one equation with one '='"),
    ("x^2 = 4", r"\^ \(write a power as \*\*\)"),
    ("sin(x) = x", "sympy cannot solve"),
])
def test_equation_solver_refuses(equation, reason):
    with pytest.raises(ToolInputError, match=reason):
        solve_equation(equation)


def test_run_call_answers_with_the_result_or_the_reason():
    plugins = select_plugins("calculator,equation")
    assert run_call({"name": "calculator", "arguments": {"expression": "12+7"}}, plugins) == "19"
    assert run_call({"name": "equation", "arguments": {"equation": "x**2-4=0"}}, plugins) == "x = -2, x = 2"
    assert run_call({"name": "calculator", "arguments": {"expression": "os.getcwd()"}}, plugins).startswith(
        "error: not allowed: calling os.getcwd()")
    assert run_call({"name": "calculator", "arguments": {"expr": "1"}}, plugins) == \
        "error: expected the argument 'expression' as text, got None"
    assert run_call({"name": "search", "arguments": {}}, plugins) == \
        "error: no tool named 'search'; available: calculator, equation"


def test_select_plugins():
    assert select_plugins(None) == {} and list(select_plugins(" equation, calculator")) == ["equation", "calculator"]
    with pytest.raises(HuayuError, match="--tools: unknown tool\\(s\\) search; available: calculator, equation"):
        select_plugins("calculator,search")
    assert PLUGINS["calculator"].schema()["function"]["parameters"]["required"] == ["expression"]
