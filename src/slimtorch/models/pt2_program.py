"""What a ``torch.export`` program's JSON may hold before ``torch.export.load`` reads it.

The program (``models/<name>.json`` in a ``.pt2`` archive) is not pickled, yet loading it runs
code it names (read in torch 2.13, ``torch/_export/serde/serialize.py`` and
``torch/export/_unlift.py``):

* every symbolic size (``expr_str``) goes through ``sympy.sympify``, which calls Python's
  ``eval`` on the string;
* ``guards_code`` strings are pasted into a Python function that ``exec`` builds and that
  runs on every call of the loaded module;
* a node's ``target`` is resolved by ``getattr`` from the ``torch``, ``_operator`` or ``math``
  module, and any callable it reaches becomes a graph call (``torch.os.system`` reaches
  ``os.system``). torch's program verifier then refuses callables that are not operators, but
  any registered operator passes, ``aten::save`` (writes a file) and ``aten::from_file``
  (reads one) among them.

So :func:`program_problem` accepts a symbolic size only as a call tree of sympy's and torch's
shape functions over integer, boolean and string constants; a guard only as a comparison of
input sizes (``L['x'].size()[0]``) and integers; and a target only as an operator path
(``torch.ops.<namespace>.<name>[.<overload>]``) or one of the integer operators that export
writes for symbolic sizes, refusing torch's non-computing namespaces (communication,
debugging, profiling) and the operators that read or write files.
"""

from __future__ import annotations

import ast
import re
from typing import Any

SYM_TARGETS = frozenset(
    [f"_operator.{op}" for op in ("add", "and_", "eq", "floordiv", "ge", "gt", "le", "lshift",
                                  "lt", "mod", "mul", "ne", "neg", "or_", "pos", "pow",
                                  "rshift", "sub", "truediv")]
    + ["math.trunc", "torch._sym_sqrt", "torch.sym_float", "torch.sym_int", "torch.sym_ite",
       "torch.sym_max", "torch.sym_min", "torch.sym_not"]
)  # fmt: skip
"""The non-operator targets ``torch.export`` serialises: integer arithmetic on sizes."""

REFUSED_NAMESPACES = frozenset(
    ["c10d", "_c10d_functional", "_c10d_functional_autograd", "symm_mem", "_dtensor", "prim",
     "debugprims", "debug_mode_ops", "profiler", "static_runtime", "_test", "export", "inductor",
     "inductor_prims", "_native"]
)  # fmt: skip
"""torch's operator namespaces for communication, debugging, profiling, tests and compiler
internals: no exported model computes with them. Namespaces of users' own operators are
allowed: an operator runs only where the process registered it, by importing its module."""

REFUSED_OPS = frozenset(["aten.save", "aten.from_file"])
"""Computing operators that touch files."""

SYMPY_CALLS = frozenset(
    # sympy's own (what ``srepr`` writes for shape expressions)
    ["Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod",
     "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan",
     "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair",
     "floor", "ceiling", "true", "false", "oo", "zoo", "nan", "Infinity", "NegativeInfinity",
     "One", "Zero", "NegativeOne", "Half",
     # torch.utils._sympy.functions, as the deserialiser names them
     "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
     "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
     "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
     "RoundDecimal", "ToFloat", "Identity", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
     "OpaqueUnaryFn_sqrt"]
)  # fmt: skip
"""Names a symbolic size may call."""

SIZE_METHODS = frozenset(["size", "stride", "storage_offset", "dim", "numel"])
"""Tensor methods a guard may call on an input."""

GUARD_FUNCS = frozenset(["max", "min", "abs", "int", "float", "Max", "Min", "Abs"])
MODULE_FUNCS = {
    "math": frozenset(["floor", "ceil", "trunc", "sqrt"]),
    "torch": frozenset(["sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "_sym_sqrt"]),
}
"""Functions a guard may call on sizes (``math.floor(...)``, ``torch.sym_float(...)``)."""

_OPERATOR = re.compile(r"torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?")
_KEY = re.compile(r"[^'\"\\\x00-\x1f]+")  # no quote, backslash or control character: torch
# pastes a guard's input keys into a string literal of the code it builds
_SYMBOL = re.compile(r"[A-Za-z_]+\d+")  # a size symbol written bare: s0, u3, ps12
_ARITHMETIC = (
    ast.Expression, ast.Load, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd,
    ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
    ast.BitAnd, ast.BitOr, ast.BitXor, ast.LShift, ast.RShift, ast.Invert,
)  # fmt: skip


def _is_math_constant(node: ast.Attribute) -> bool:
    return (
        isinstance(node.value, ast.Name)
        and node.value.id == "math"
        and (node.attr in ("inf", "nan", "pi", "e"))
    )


def target_problem(target: str) -> str | None:
    """Why a node's ``target`` is refused (``None``: a known operator).

    Example:
        >>> target_problem("torch.ops.aten.conv2d.default") is None
        True
        >>> target_problem("torch.os.system").endswith("which is not a registered operator")
        True
    """
    if target in SYM_TARGETS:
        return None
    match = _OPERATOR.fullmatch(target)
    if match is None or any(p is not None and p.startswith("__") for p in match.groups()):
        return f"calls {target!r}, which is not a registered operator"
    ns, op = match.group(1), match.group(2)
    if ns in REFUSED_NAMESPACES:
        return f"calls {target!r}: torch's {ns!r} operators do not compute a model's outputs"
    if f"{ns}.{op}" in REFUSED_OPS:
        return f"calls {target!r}, which reads or writes files"
    return None


def _expression(text: str) -> ast.Expression | None:
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def sym_expr_problem(text: str) -> str | None:
    """Why a symbolic size string is refused (``None``: a call tree of shape functions).

    Example:
        >>> sym_expr_problem("Mul(Integer(2), Symbol('s77', positive=True, integer=True))")
        >>> sym_expr_problem("__import__('os').getcwd()").endswith("is not a shape expression")
        True
    """
    tree = _expression(text)
    bad = f"symbolic size {text[:80]!r} is not a shape expression"
    if tree is None:
        return bad
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in SYMPY_CALLS:
                return bad
            if any(k.arg is None or not isinstance(k.value, ast.Constant) for k in node.keywords):
                return bad
        elif isinstance(node, ast.Name):
            if node.id not in SYMPY_CALLS and not _SYMBOL.fullmatch(node.id):
                return bad
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, int | float | str | type(None)):
                return bad
        elif not isinstance(node, (*_ARITHMETIC, ast.keyword)):
            return bad
    return None


def guard_problem(text: str) -> str | None:
    """Why a guard string is refused (``None``: a comparison of input sizes and integers).

    Example:
        >>> guard_problem("1 + (L['x'].size()[0] // 2) <= L['x'].size()[0]")
        >>> guard_problem("__import__('os').system('true') == 0").endswith("of input sizes")
        True
    """
    tree = _expression(text)
    bad = f"guard {text[:80]!r} is not a comparison of input sizes"
    if tree is None:
        return bad
    calls = set()  # the functions of allowed calls: their names and attributes are checked here
    for node in ast.walk(tree):  # breadth first: a call is seen before its function
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in SIZE_METHODS:
                ok = not node.args and not node.keywords
            elif isinstance(func, ast.Attribute):  # math.floor(...), torch.sym_float(...)
                ok = isinstance(func.value, ast.Name) and func.attr in MODULE_FUNCS.get(
                    func.value.id, ()
                )
                calls.add(id(func.value))
            else:
                ok = isinstance(func, ast.Name) and func.id in GUARD_FUNCS
            if not ok or node.keywords:
                return bad
            calls.add(id(func))
        elif isinstance(node, ast.Attribute) and _is_math_constant(node):
            calls.add(id(node.value))  # math.inf, math.nan
        elif isinstance(node, ast.Attribute | ast.Name):
            if id(node) not in calls and not (isinstance(node, ast.Name) and node.id == "L"):
                return bad
        elif isinstance(node, ast.Subscript):
            key = node.slice
            if not isinstance(key, ast.Constant) or isinstance(key.value, bool):
                return bad
            if not isinstance(key.value, int) and not _KEY.fullmatch(str(key.value)):
                return bad
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, int | float | str):
                return bad
            if isinstance(node.value, str) and not _KEY.fullmatch(node.value):
                return bad
        elif not isinstance(node, _ARITHMETIC):
            return bad
    return None


def program_problem(program: Any) -> str | None:
    """Why a parsed program JSON is refused (``None``: nothing in it runs code on load).

    Walks the whole document: every ``target`` (subgraphs included), every ``expr_str``, the
    range constraints' symbol names and ``guards_code``.

    Example:
        >>> program_problem({"graph_module": {"graph": {"nodes": [
        ...     {"target": "torch.ops.aten.relu.default", "inputs": [], "outputs": []}]}},
        ...     "guards_code": []})
        >>> program_problem({"guards_code": ["__import__('os') == 0"]}).startswith("guard ")
        True
    """
    if not isinstance(program, dict):
        return "the program is not a JSON object"
    guards = program.get("guards_code", [])
    if not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
        return "guards_code is not a list of strings"
    for guard in guards:
        if (problem := guard_problem(guard)) is not None:
            return problem
    constraints = program.get("range_constraints", {})
    if isinstance(constraints, dict):
        for key in constraints:
            if (problem := sym_expr_problem(key)) is not None:
                return problem
    stack: list[Any] = [program]
    while stack:  # iterative: a deep document cannot exhaust the Python stack here
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "target" and isinstance(value, str):
                    problem = target_problem(value)
                elif key == "expr_str" and isinstance(value, str):
                    problem = sym_expr_problem(value)
                else:
                    stack.append(value)
                    continue
                if problem is not None:
                    return problem
        elif isinstance(item, list):
            stack.extend(item)
    return None
