"""Fingerprints: stable under moves, reformatting and comments; sensitive to behaviour."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

from hotwire.sdk import ProcessPE
from hotwire.sdk.fingerprint import fingerprint, pe_fingerprint


def load(source: str, name: str = "f") -> object:
    """Compile ``source`` in a fresh namespace, as a new version of an app file would be."""
    ns: dict[str, object] = {"__name__": "app_version"}
    exec(compile(textwrap.dedent(source), "app.py", "exec"), ns)
    return ns[name]


def fp(source: str, name: str = "f") -> str:
    return fingerprint(load(source, name))


BASE = """
def f(r):
    return r["amount"] * 2 + 1
"""


def test_same_code_same_fingerprint() -> None:
    assert fp(BASE) == fp(BASE)
    assert len(fp(BASE)) == 64


def test_moved_reformatted_and_commented_keeps_fingerprint() -> None:
    moved = "\n\n\n# a comment\nX_UNUSED = 1\n\n" + BASE
    reformatted = """
    # the same function, formatted differently
    def f(
        r,   # the record
    ):
        return (r["amount"]
                * 2   # doubled
                + 1)
    """
    other_file = BASE
    a = fp(BASE)
    assert fp(moved) == a
    assert fp(reformatted) == a
    ns: dict[str, object] = {"__name__": "x"}
    exec(compile(other_file, "/elsewhere/other.py", "exec"), ns)
    assert fingerprint(ns["f"]) == a


def test_changed_body_constant_and_names_change_fingerprint() -> None:
    a = fp(BASE)
    assert fp('def f(r):\n    return r["amount"] * 3 + 1\n') != a
    assert fp('def f(r):\n    return r["amount"] * 2 - 1\n') != a
    assert fp('def f(r):\n    return r["total"] * 2 + 1\n') != a
    assert fp('def f(x):\n    return x["amount"] * 2 + 1\n') != a


def test_closure_value_changes_fingerprint() -> None:
    src = """
    def make(k):
        def f(r):
            return r * k
        return f
    """
    make = load(src, "make")
    assert fingerprint(make(2)) == fingerprint(make(2))
    assert fingerprint(make(2)) != fingerprint(make(3))


def test_defaults_and_kwdefaults_change_fingerprint() -> None:
    assert fp("def f(r, k=2):\n    return r * k\n") != fp("def f(r, k=3):\n    return r * k\n")
    assert fp("def f(r, *, k=2):\n    return r * k\n") != fp(
        "def f(r, *, k=3):\n    return r * k\n"
    )


def test_same_module_helper_body_changes_fingerprint() -> None:
    v1 = """
    def helper(x):
        return x + 1

    def f(r):
        return helper(r)
    """
    v2 = v1.replace("x + 1", "x + 2")
    v1_moved = "\n\n# moved\n" + textwrap.dedent(v1).replace(
        "return helper(r)", "return helper(r)  # same"
    )
    assert fp(v1) != fp(v2)
    assert fp(v1) == fp(v1_moved)


def test_helper_used_only_in_nested_lambda_is_followed() -> None:
    v1 = """
    def helper(x):
        return x + 1

    def f(rs):
        return [helper(r) for r in rs]
    """
    assert fp(v1) != fp(v1.replace("x + 1", "x - 1"))


def test_module_constant_changes_fingerprint() -> None:
    v1 = """
    LIMIT = 100
    TAGS = frozenset({"a", "b"})

    def f(r):
        return r > LIMIT and r in TAGS
    """
    assert fp(v1) != fp(v1.replace("LIMIT = 100", "LIMIT = 101"))
    assert fp(v1) != fp(v1.replace('"b"', '"c"'))


def test_recursive_and_mutually_recursive_functions_terminate() -> None:
    v1 = """
    def even(n):
        return True if n == 0 else odd(n - 1)

    def odd(n):
        return False if n == 0 else even(n - 1)

    def f(n):
        return f(n - 1) if n > 10 else even(n)
    """
    assert fp(v1) == fp(v1)
    assert fp(v1) != fp(v1.replace("n == 0 else even", "n == 1 else even"))


def test_classes_fingerprint_methods_and_bases() -> None:
    src = """
    from hotwire.sdk import ProcessPE

    class Base(ProcessPE):
        def helper(self, r):
            return r + 1

    class MyPE(Base):
        factor = 2

        def process(self, r):
            return [self.helper(r) * self.factor]

        @staticmethod
        def tool(x):
            return x

        @property
        def name(self):
            return "p"
    """
    a = fp(src, "MyPE")
    assert fp("\n# moved\n" + textwrap.dedent(src), "MyPE") == a
    assert fp(src.replace("factor = 2", "factor = 3"), "MyPE") != a
    assert fp(src.replace("r + 1", "r + 2"), "MyPE") != a
    assert fp(src.replace("return x", "return -x"), "MyPE") != a
    assert fp(src.replace('return "p"', 'return "q"'), "MyPE") != a
    assert issubclass(load(src, "MyPE"), ProcessPE)  # type: ignore[arg-type]


def test_class_using_super_terminates() -> None:
    src = """
    class A:
        def go(self):
            return 1

    class B(A):
        def go(self):
            return super().go() + 1
    """
    assert fp(src, "B") == fp(src, "B")


def test_partial_method_and_callable_object() -> None:
    f = load(BASE)
    assert fingerprint(functools.partial(f, 1)) != fingerprint(functools.partial(f, 2))
    src = """
    class Scale:
        def __init__(self, k):
            self.k = k

        def __call__(self, r):
            return r * self.k
    """
    scale = load(src, "Scale")
    assert fingerprint(scale(2)) == fingerprint(scale(2))  # type: ignore[operator]
    assert fingerprint(scale(2)) != fingerprint(scale(3))  # type: ignore[operator]
    assert fingerprint(scale(2).__call__) != fingerprint(scale(3).__call__)  # type: ignore[operator]


def test_builtins_and_library_functions() -> None:
    assert fingerprint(print) == fingerprint(print)
    assert fingerprint(print) != fingerprint(len)
    import json

    assert fingerprint(json.dumps) != fingerprint(json.loads)


def test_pe_fingerprint_covers_kind_callable_and_config() -> None:
    f = load(BASE)
    a = pe_fingerprint("map", f, {"a": 1, "b": [1, 2]})
    assert pe_fingerprint("map", f, {"b": [1, 2], "a": 1}) == a  # key order ignored
    assert pe_fingerprint("map", f, {"a": 2, "b": [1, 2]}) != a
    assert pe_fingerprint("filter", f, {"a": 1, "b": [1, 2]}) != a
    assert pe_fingerprint("map", load(BASE.replace("2", "5")), {"a": 1, "b": [1, 2]}) != a


def test_fingerprint_is_stable_across_processes() -> None:
    """No hash randomisation, ids or addresses leak into a fingerprint."""
    code = textwrap.dedent(
        """
        import textwrap
        from hotwire.sdk.fingerprint import fingerprint
        src = '''
        TAGS = frozenset({"a", "b", "c", "d"})
        def helper(x):
            return x in {"p", "q"}
        class K:
            s = {"x", "y", "z"}
            def m(self):
                return helper(1) and TAGS
        def f(r, k={"u": 1}):
            return helper(r) or TAGS or K
        '''
        ns = {"__name__": "v"}
        exec(textwrap.dedent(src), ns)
        print(fingerprint(ns["f"]))
        """
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2, 3)
    }
    assert len(outs) == 1


def test_library_objects_in_closures_and_self_references() -> None:
    import pathlib
    import re

    src = """
    def make(v):
        def f(r):
            return v
        return f
    """
    make = load(src, "make")
    assert fingerprint(make(pathlib.Path("/a"))) != fingerprint(make(pathlib.Path("/b")))
    assert fingerprint(make(re.compile("a+"))) != fingerprint(make(re.compile("b+")))
    assert fingerprint(make(object())) == fingerprint(make(object()))  # no addresses
    loop: list[object] = [1]
    loop.append(loop)
    assert fingerprint(make(loop)) == fingerprint(make(loop))


def test_app_file_module_name_is_left_out() -> None:
    # An app file is imported as hotwire_app_file_<hash of its content>: editing one PE
    # renames the module, and a global instance of one of its classes (a client, a
    # writer) must not make every PE that uses it look changed.
    src = """
    class Lines:
        def __init__(self, path):
            self.path = path

    OUT = Lines("/tmp/out")

    def f(r):
        return OUT
    """
    fps = []
    for name in ("hotwire_app_file_0123456789abcdef", "hotwire_app_file_fedcba9876543210"):
        ns: dict[str, object] = {"__name__": name}
        exec(compile(textwrap.dedent(src), "app.py", "exec"), ns)
        fps.append(fingerprint(ns["f"]))
    assert fps[0] == fps[1]
