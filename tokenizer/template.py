"""Chat templates rendered with bounded work and memory. A template is a program shipped in a
model's folder: a nested loop, a recursive macro or a string doubled in a loop would otherwise
run for hours or until MemoryError. The environment is transformers' apply_chat_template's
(sandboxed, trim_blocks, lstrip_blocks, loop controls, raise_exception, strftime_now, a tojson
that keeps non-ASCII); a budget per render, from the size n (characters) of what is rendered:
  - steps: every loop iteration and every call (macro, method, function) counts one; at most
    MAX_STEPS + 4n.
  - size: every value printed (into the output, or into a macro's or a set block's buffer),
    every result of + * % ** ~ and of the filters and string methods that make long strings,
    and every value a filter or call receives, is at most MAX_CHARS + 8n characters, counted
    before it is built (a list or dict counts its items).
  - work: the characters of everything built (printed, results of operators, filters and string
    methods) and the items of the template's own lists measured (NODE_COST each), at most
    MAX_WORK + 64n: a loop that copies a long value again and again stops too.
Past any of them, TemplateLimitError (a ValueError) names the template and the limit. Not
counted: comparisons and `in` on values already built (bounded by steps x size).
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import datetime

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, pass_context
from jinja2.visitor import NodeTransformer

MAX_STEPS, MAX_CHARS, MAX_WORK = 1 << 18, 1 << 20, 1 << 26
NODE_COST = 16  # work units per list or dict item measured: a Python step, against a character copied
MAX_BITS = 1 << 16  # integers: far beyond anything a prompt prints
SPEC_NUMBER = re.compile(r"%[-#0 +]*(\d+|\*)?(?:\.(\d+|\*))?|\{[^{}]*?:[^{}\d]*(\d+)")  # widths, precisions


class TemplateLimitError(ValueError):
    pass


class Budget:
    def __init__(self, source, variables):
        self.source, self.known, self.work = source, {}, 0
        self.chars = self.max_work = math.inf
        n = sum(self._measure(v) for v in variables.values())  # what is rendered, measured once
        self.steps = self.max_steps = MAX_STEPS + 4 * n
        self.chars, self.max_work, self.printed = MAX_CHARS + 8 * n, MAX_WORK + 64 * n, 0

    def _measure(self, x):  # an input's lists, tuples and dicts live through the render: remembered by id
        if isinstance(x, (list, tuple, dict)) and id(x) not in self.known:
            self.known[id(x)] = 2 + sum(self._measure(i) + 2 for i in (_items(x)))
        return self.size(x)

    def step(self):
        self.steps -= 1
        if self.steps < 0:
            raise TemplateLimitError(f"{self.source}: rendering stopped after {self.max_steps:,} loop iterations "
                                     "and calls, this project's limit for this input")

    def spend(self, n):
        self.work += n
        if self.work > self.max_work:
            raise TemplateLimitError(f"{self.source}: rendering stopped after building and measuring "
                                     f"{self.max_work:,} characters and items, this project's limit for this input")

    def check(self, n, what):
        if n > self.chars:
            raise TemplateLimitError(f"{self.source}: {what} of {n:,} characters, above this project's limit "
                                     f"of {self.chars:,} for this input")
        return n

    def built(self, n, what):
        self.spend(self.check(n, what))
        return n

    def size(self, x) -> int:
        """About len(str(x)), without building it: an input's containers as measured at the
        start, the template's own item by item (NODE_COST work each) until past the limit."""
        if isinstance(x, str):
            return len(x)
        if isinstance(x, bool) or x is None or isinstance(x, float):
            return 24
        if isinstance(x, int):
            return x.bit_length() // 3 + 2
        if isinstance(x, Namespace):
            x = object.__getattribute__(x, "_Namespace__attrs")
        elif not isinstance(x, (list, tuple, dict)):
            return 64
        if id(x) in self.known:
            return self.known[id(x)]
        total = 2
        for i in _items(x):
            self.spend(NODE_COST)
            total += self.size(i) + 2
            if total > self.chars:
                break
        return total


def _items(x):
    return [*x.keys(), *x.values()] if isinstance(x, dict) else x


_budget: ContextVar[Budget] = ContextVar("chat template budget")


def _spec_numbers(fmt: str) -> int:
    """The largest width or precision a format string asks for (% or {} style); '*' is refused."""
    found = [g for m in SPEC_NUMBER.finditer(fmt) for g in m.groups() if g]
    if "*" in found:
        raise TemplateLimitError(f"{_budget.get().source}: a '*' width in a format string")
    return max(map(int, found), default=0)


def _binop(b, op, left, right):
    """The size of left op right, or None when it cannot be large."""
    seqs = (str, list, tuple)
    if op == "+" and isinstance(left, seqs) and isinstance(right, seqs):
        return b.size(left) + b.size(right)
    if op == "*" and isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_BITS:
            raise TemplateLimitError(f"{b.source}: a product of more than {MAX_BITS} bits")
    elif op == "*" and isinstance(left, int) != isinstance(right, int):
        seq, n = (right, left) if isinstance(left, int) else (left, right)
        return b.size(seq) * max(n, 0) if isinstance(seq, seqs) else None
    if op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        if right * left.bit_length() > MAX_BITS:
            raise TemplateLimitError(f"{b.source}: a power of more than {MAX_BITS} bits")
    if op == "%" and isinstance(left, str):
        return len(left) + b.size(right) + _spec_numbers(left)
    return None


def _str_method(b, method, args):
    """The size of a long-string-making str method's result, or None for the others."""
    s, name = method.__self__, method.__name__
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        return max(len(s), args[0])
    if name == "expandtabs":
        return len(s) + s.count("\t") * (args[0] if args and isinstance(args[0], int) else 8)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        return _replaced(s, *args[:2])
    if name == "join" and args:
        return b.size(args[0]) + len(s) * len(args[0])
    if name in ("format", "format_map"):
        return len(s) + sum(map(b.size, args)) + _spec_numbers(s)
    return None


# the filters that make long strings from short input: their result's size from their arguments
LONG_FILTERS = {
    "center": lambda b, s, width=80: max(b.size(s), width),
    "indent": lambda b, s, width=4, *a, **k: b.size(s) + (width if isinstance(width, int) else len(width)) * (
        s.count("\n") + 1 if isinstance(s, str) else b.size(s)),
    "join": lambda b, items, d="", attribute=None: b.size(items) + len(str(d)) * len(items),
    "replace": lambda b, s, old, new, count=None: _replaced(str(s), str(old), str(new)),
    "format": lambda b, s, *a, **k: b.size(s) + b.size(list(a)) + b.size(k) + _spec_numbers(str(s)),
    "tojson": lambda b, x, indent=None, **k: b.size(x) * (2 + (indent if isinstance(indent, int) else 0)),
    "batch": lambda b, items, *a, **k: b.size(items) + _ints(a, k),
    "slice": lambda b, items, *a, **k: b.size(items) + _ints(a, k),
}


def _replaced(s, old, new):
    return len(s) + (s.count(old) * (len(new) - len(old)) if old else (len(s) + 1) * len(new))


def _ints(args, kwargs):
    return sum(x for x in (*args, *kwargs.values()) if isinstance(x, int))


def _bounded_filter(name, f):
    @pass_context
    def run(context, value, *args, **kwargs):
        b = _budget.get()
        if name in LONG_FILTERS and isinstance(value, Iterator):  # measured, then given as it was
            value = list(value)
        for a in (value, *args, *kwargs.values()):
            b.check(b.size(a), f"a value given to |{name}")
        if name in LONG_FILTERS:
            b.check(LONG_FILTERS[name](b, value, *args, **kwargs), f"the result of |{name}")
        arg = getattr(f, "jinja_pass_arg", None)
        extra = {"context": (context,), "eval_context": (context.eval_ctx,),
                 "environment": (context.environment,)}.get(getattr(arg, "name", None), ())
        result = f(*extra, value, *args, **kwargs)
        b.built(b.size(result), f"the result of |{name}")  # at most a small multiple of its input
        return result
    return run


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def call_binop(self, context, operator, left, right):
        b = _budget.get()
        n = _binop(b, operator, left, right)
        if n is not None:
            b.built(n, f"the result of {operator}")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        b = _budget.get()
        b.step()
        for a in (*args, *kwargs.values()):
            b.check(b.size(a), "a value given to a call")
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        if isinstance(getattr(method, "__self__", None), str):
            args = tuple(list(a) if isinstance(a, Iterator) else a for a in args)  # measured, then given
            n = _str_method(b, method, args)
            if n is not None:
                b.check(n, f"the result of .{method.__name__}()")
            result = super().call(__context, __obj, *args, **kwargs)
            b.built(b.size(result), f"the result of .{method.__name__}()")
            return result
        return super().call(__context, __obj, *args, **kwargs)


def _steps(iterable):
    b = _budget.get()
    for x in iterable:
        b.step()
        yield x


def _printed(x):
    b = _budget.get()
    b.printed += b.built(b.size(x), "a printed value")
    b.check(b.printed, "the printed text")
    return str(x)


def _concat(*parts):
    b = _budget.get()
    b.built(sum(map(b.size, parts)), "the result of ~")
    return "".join(map(str, parts))


class _Bound(NodeTransformer):
    """Every loop's iterable, every printed value and every ~ go through the budget."""

    @staticmethod
    def _call(name, *args, lineno):
        return nodes.Call(nodes.Name(name, "load", lineno=lineno), list(args), [], None, None, lineno=lineno)

    def visit_For(self, node):
        self.generic_visit(node)
        node.iter = self._call("__steps__", node.iter, lineno=node.lineno)
        return node

    def visit_Output(self, node):
        self.generic_visit(node)
        node.nodes = [self._call("__printed__", n, lineno=n.lineno) for n in node.nodes]
        return node

    def visit_Concat(self, node):
        self.generic_visit(node)
        return self._call("__concat__", *node.nodes, lineno=node.lineno)


def _raise(message):
    raise TemplateError(message)


@functools.lru_cache(maxsize=8)
def compiled(template):
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       __steps__=_steps, __printed__=_printed, __concat__=_concat)
    tree = _Bound().visit(env.parse(template))
    tree.set_environment(env)
    return env.from_string(tree)


def render(template, source, **variables) -> str:
    """template rendered with variables, within the budget for their size; source names the
    template in errors (e.g. its tokenizer_config.json)."""
    token = _budget.set(Budget(source, variables))
    try:
        return compiled(template).render(**variables)
    except RecursionError:
        raise TemplateLimitError(f"{source}: rendering stopped: macros, loops or values nested too deep") from None
    finally:
        _budget.reset(token)
