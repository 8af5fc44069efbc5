"""Cache keys without processes: what changes a function's digest, what does not, and what ``why`` says."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from parroles import Role
from parroles.cache.code import CodeDigests, NotReusable
from parroles.cache.keys import code_part, differences, input_files, key_of
from parroles.digests import canonical_json


def module_of(source: str, name: str = "mod") -> types.ModuleType:
    """A module made from ``source`` (as if imported), so that its functions' globals are its own."""
    module = types.ModuleType(name)
    exec(compile(textwrap.dedent(source), f"{name}.py", "exec"), module.__dict__)
    return module


def digest(fn: Any) -> str:
    return CodeDigests().digest(fn)


def test_a_function_moved_keeps_its_digest_and_a_changed_body_does_not():
    first = module_of("def f(x):\n    return x + 1\n")
    moved = module_of("\n\n\n# a comment above\ndef f(x):\n    return x + 1\n")
    changed = module_of("def f(x):\n    return x + 2\n")
    assert digest(first.f) == digest(moved.f)
    assert digest(first.f) != digest(changed.f)


def test_lambdas_and_nested_code_count():
    assert digest(lambda x: x * 2) == digest(lambda x: x * 2)
    assert digest(lambda x: x * 2) != digest(lambda x: x * 3)
    inner_a = module_of("def f(xs):\n    return [x + 1 for x in xs]\n")
    inner_b = module_of("def f(xs):\n    return [x + 2 for x in xs]\n")
    assert digest(inner_a.f) != digest(inner_b.f)  # the comprehension's own code object


def test_closure_values_are_part_of_the_digest_and_an_unencodable_one_makes_it_not_reusable():
    def make(scale: Any) -> Any:
        return lambda x: x * scale

    assert digest(make(2)) == digest(make(2))
    assert digest(make(2)) != digest(make(3))
    assert digest(make(Path("a"))) != digest(make(Path("b")))  # a path counts by what it names
    with pytest.raises(NotReusable, match="closure variable 'scale' holds a object"):
        digest(make(object()))


def test_helpers_and_constants_of_the_same_module_are_followed():
    source = "LIMIT = {limit}\ndef helper(x):\n    return x * {factor}\ndef f(x):\n    return min(helper(x), LIMIT)\n"
    base = module_of(source.format(limit=10, factor=2))
    assert digest(base.f) == digest(module_of(source.format(limit=10, factor=2)).f)
    assert digest(base.f) != digest(module_of(source.format(limit=10, factor=3)).f)  # the helper changed
    assert digest(base.f) != digest(module_of(source.format(limit=11, factor=2)).f)  # the constant changed


def test_recursive_helpers_end():
    mod = module_of("def even(n):\n    return n == 0 or odd(n - 1)\ndef odd(n):\n    return n != 0 and even(n - 1)\n")
    assert digest(mod.even) == digest(mod.even)


def test_cache_includes_name_each_helper_and_why_says_which_changed():
    helpers = module_of("def clean(x):\n    return x.strip()\n", "helpers")
    changed = module_of("def clean(x):\n    return x.strip().lower()\n", "helpers")
    fn = module_of("def f(x):\n    return x\n", "tasks").f
    before = code_part(CodeDigests(), fn, None, [helpers.clean])
    after = code_part(CodeDigests(), fn, None, [changed.clean])
    assert before["digest"] == after["digest"]
    assert before["includes"] != after["includes"]
    assert differences({"code": before}, {"code": after}) == ["code of helpers:clean changed"]


def test_a_partial_counts_its_arguments_and_a_bound_method_is_not_reusable():
    def add(x: int, y: int) -> int:
        return x + y

    assert digest(functools.partial(add, 1)) != digest(functools.partial(add, 2))

    class Model:
        def fit(self) -> None:
            pass

    with pytest.raises(NotReusable, match="bound method"):
        digest(Model().fit)


def test_a_version_stands_in_for_the_code():
    fn = module_of("def f():\n    return 1\n").f
    other = module_of("def f():\n    return 2\n").f
    assert code_part(CodeDigests(), fn, "2") == code_part(CodeDigests(), other, "2") == {"call": "mod:f",
                                                                                          "version": "2"}


def test_frozenset_constants_hash_alike_in_every_process():
    """A set literal in a function is a frozenset constant, whose order follows per-process string hashing."""
    script = ("from parroles.cache.code import CodeDigests\n"
              "def f(x):\n    return x in {'alpha', 'beta', 'gamma', 'delta'}\n"
              "print(CodeDigests().digest(f))\n")
    digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60,
                              env=os.environ | {"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(digests) == 1


def code_of(fn: Any) -> Any:
    return lambda: canonical_json(code_part(CodeDigests(), fn, None))


def test_keys_from_parts_and_not_reusable_params():
    fn = module_of("def f(**kw):\n    return kw\n").f
    key = key_of("train", code_of(fn), {"lr": 0.1}, {"prep": "ab" * 32}, ())
    assert key.digest is not None and key.parts["params"] == {"lr": 0.1}
    # Built part by part, the text is the canonical JSON of the parts, and the key its SHA-256.
    assert key.parts_json == canonical_json(key.parts)
    assert key.digest == hashlib.sha256(canonical_json(key.parts).encode()).hexdigest()
    assert key == key_of("train", code_of(fn), {"lr": 0.1}, {"prep": "ab" * 32}, ())
    assert key.digest != key_of("train", code_of(fn), {"lr": 0.01}, {"prep": "ab" * 32}, ()).digest
    assert key.digest != key_of("train", code_of(fn), {"lr": 0.1}, {"prep": "cd" * 32}, ()).digest
    odd = key_of("train", code_of(fn), {"lr": {1, 2}}, {}, ())
    assert odd.digest is None and "params have no canonical JSON" in (odd.not_reusable or "")


def test_input_files_are_digested_and_their_changes_named(tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("1,2\n")
    first = input_files(["data/*.csv"], str(tmp_path))
    (tmp_path / "data" / "a.csv").write_text("1,3\n")
    (tmp_path / "data" / "b.csv").write_text("4\n")
    second = input_files(["data/*.csv"], str(tmp_path))
    assert list(first["files"]) == ["data/a.csv"] and list(second["files"]) == ["data/a.csv", "data/b.csv"]
    assert differences({"inputs": first}, {"inputs": second}) == ["data/a.csv changed", "data/b.csv is new"]


def test_differences_name_each_part():
    old = {"role": "t", "code": {"call": "m:f", "digest": "1" * 64}, "params": {"lr": 0.1, "k": 1},
           "needs": {"prep": "a1b2" + "0" * 60}}
    new = {"role": "t", "code": {"call": "m:f", "digest": "2" * 64}, "params": {"lr": 0.01, "depth": 3},
           "needs": {"prep": "c3d4" + "0" * 60}}
    assert differences(old, new) == [
        "code of m:f changed", "params.depth added: 3", "params.k removed (was 1)", "params.lr 0.1 → 0.01",
        "input from prep changed: digest a1b20000 → c3d40000"]
    assert differences(old, old) == []
    versioned = differences({"code": {"call": "m:f", "version": "1"}}, {"code": {"call": "m:f", "version": "2"}})
    assert versioned == ["version 1 → 2"]


def test_role_checks_its_key_parts():
    from parroles import ConfigError

    with pytest.raises(ConfigError, match="version must be a non-empty string"):
        Role("a", lambda: 1, version="")
    with pytest.raises(ConfigError, match="inputs must be a list of file patterns"):
        Role("a", lambda: 1, inputs="data/*.csv")
    with pytest.raises(ConfigError, match="cache_includes must list functions"):
        Role("a", lambda: 1, cache_includes=[1])
    for field, message in (("inputs", "inputs must be a list"), ("cache_includes", "cache_includes must list"),
                           ("needs", "needs must be a list")):
        with pytest.raises(ConfigError, match=message):  # was a TypeError
            Role("a", lambda: 1, **{field: None})


def test_a_role_reads_a_generator_of_inputs_helpers_or_needs_once():
    """A breaker's find (issue 26): a generator was checked, then stored empty."""

    def helper() -> int:
        return 1

    role = Role("a", lambda: 1, inputs=(p for p in ["x.csv", "y/*.csv"]), cache_includes=(h for h in [helper]),
                needs=(n for n in ["b", "c"]))
    assert (role.inputs, role.cache_includes, role.needs) == (("x.csv", "y/*.csv"), (helper,), ("b", "c"))


def test_a_decorated_helper_or_a_partial_beside_the_role_is_followed():
    """An lru_cache'd helper and a module-level partial are functions of the module: a change changes the key."""
    source = "import functools\n@functools.lru_cache\ndef h():\n    return {v}\nhp = functools.partial(lambda k: k, k={v})\n" \
             "def f():\n    return h()\ndef g():\n    return hp()\n"
    first, second = module_of(source.format(v=1)), module_of(source.format(v=2))
    assert digest(first.f) != digest(second.f)
    assert digest(first.g) != digest(second.g)
    assert digest(first.f) == digest(module_of(source.format(v=1)).f)


def test_where_a_try_starts_is_part_of_the_code():
    """Same bytecode, another exception table (3.11+): the call to g is guarded in one, not in the other."""
    guarded = module_of("def f(x):\n    try: y = g(x); return h(y)\n    except KeyError: return 0\n")
    unguarded = module_of("def f(x):\n    y = g(x); \n    try: return h(y)\n    except KeyError: return 0\n")
    assert digest(guarded.f) != digest(unguarded.f)


def test_dict_keys_json_would_turn_into_strings_are_not_confused():
    """{1: x} and {"1": x} are one JSON object: params holding one are not reusable, a global's keys keep their type."""
    assert key_of("r", lambda: "{}", {"m": {1: "x"}}, {}, ()).digest is None
    assert "key that is no string" in key_of("r", lambda: "{}", {"m": {1: "x"}}, {}, ()).not_reusable
    source = "S = {key}\ndef f():\n    return S.get(1)\n"
    digests = {digest(module_of(source.format(key=key)).f) for key in ('{1: "x"}', '{"1": "x"}', '{1: "y"}')}
    assert len(digests) == 3


def test_a_key_that_cannot_be_computed_makes_the_run_not_reusable_never_stops_the_batch(tmp_path, monkeypatch):
    """A declared input gone between the glob and its read (another role deletes it) is no crash of the batch."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("a")
    real_open = open

    def vanishing(path, *args, **kwargs):
        if str(path).endswith("a.txt"):
            raise FileNotFoundError(2, "No such file or directory")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", vanishing)
    key = key_of("r", lambda: "{}", {}, {}, ["*.txt"])
    assert key.digest is None and "a.txt could not be read" in key.not_reusable

    def broken() -> str:
        raise RecursionError("maximum recursion depth exceeded")

    assert "RecursionError" in key_of("r", broken, {}, {}, ()).not_reusable


def test_a_large_table_beside_many_closures_is_read_once():
    module = module_of("TABLE = {f'k{i}': i for i in range(200_000)}\ndef look(k):\n    return TABLE[k]\n"
                       "def make(i):\n    return lambda: look(f'k{i}')\n")
    codes = CodeDigests()
    import time
    started = time.perf_counter()
    digests = {codes.digest(module.make(i)) for i in range(200)}
    assert len(digests) == 200
    assert time.perf_counter() - started < 5


def test_why_tells_a_list_of_1_from_a_list_of_1_0():
    assert differences({"params": {"x": [1, True]}}, {"params": {"x": [1.0, 1]}}) == ["params.x [1, true] → [1.0, 1]"]


def test_an_input_pattern_that_matches_nothing_makes_the_run_not_reusable(tmp_path: Path):
    fn = module_of("def f():\n    return 1\n").f
    key = key_of("reader", code_of(fn), None, {}, ["data/*.csv"], str(tmp_path))
    assert key.digest is None and "input pattern 'data/*.csv' matches no file" in (key.not_reusable or "")


def test_file_digests_are_read_once_while_a_file_stays_as_it_was(tmp_path: Path, monkeypatch):
    from parroles.cache.keys import FileDigests

    data = tmp_path / "data.csv"
    data.write_text("1,2\n")
    settled = FileDigests()
    settled.SETTLED = -1.0  # as if every file had been written long ago
    first = settled.digest(str(data))
    reads = []
    monkeypatch.setattr(hashlib, "file_digest", lambda *a: reads.append(a) or hashlib.sha256(b"x"))
    assert settled.digest(str(data)) == first and reads == []  # kept
    data.write_text("1,3\n")  # changed: its size, mtime or ctime tell
    assert settled.digest(str(data)) != first and len(reads) == 1
    fresh = FileDigests()  # a file written just now is read every time: a second write could keep its stamp
    fresh.digest(str(data))
    fresh.digest(str(data))
    assert len(reads) == 3
