#!/usr/bin/env python3
"""Fails when the modules of a crate import each other in a loop.

Each crate's modules (one per file under src/) are read for the paths they name:
`use crate::a::b`, `crate::a::b::f(..)` in code, `super::x` and `self::x`, `pub use`
included. A path is taken to point at the deepest module of the crate it names. Unit
tests (`#[cfg(test)] mod tests { .. }` at the end of a file) are left out: a test may
use anything. A module naming its own submodules (or the other way round) counts like
any other import, as `cargo modules dependencies --acyclic` counts it.

A loop found here and listed in scripts/module-cycles.allowed (one per line, the
modules in the order printed) is reported but does not fail: that file holds the
loops known when the check came in, to be emptied, never added to. A listed loop that
is gone fails too, so that the list shrinks as they are untied.

Run: python3 scripts/module-cycles.py (from the repository root). Exit status 1 on a
new or stale loop. `--self-test` checks the reader on made-up crates.
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED = os.path.join(ROOT, "scripts", "module-cycles.allowed")


def crate_sources():
    """(crate name, src dir) of the root package and every crate under crates/."""
    out = [("cloudbus", os.path.join(ROOT, "src"))]
    crates = os.path.join(ROOT, "crates")
    for name in sorted(os.listdir(crates)):
        src = os.path.join(crates, name, "src")
        if os.path.isdir(src):
            out.append((name, src))
    return out


def modules_of(src):
    """Module path (tuple) -> file, for every .rs file under `src`."""
    modules = {}
    for folder, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.relpath(os.path.join(folder, f), src)
            parts = path[:-3].split(os.sep)
            if parts[-1] in ("lib", "main") and len(parts) == 1:
                parts = []
            elif parts[-1] == "mod":
                parts = parts[:-1]
            elif parts[0] == "bin":
                continue
            modules[tuple(parts)] = os.path.join(folder, f)
    return modules


def without_tests(text):
    """The text without a trailing `#[cfg(test)] mod tests` block, comments and
    string literals (so that paths in docs and messages are not read as imports)."""
    match = re.search(r"\n#\[cfg\(test\)\]\s*\nmod \w+\s*\{", text)
    if match:
        text = text[: match.start()]
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return text


PATH = re.compile(r"(?<![$\w])(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP = re.compile(r"(?<![$\w])(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*?)\}", re.S)


def targets(module, text, modules):
    """The modules of the crate that `module`'s text names."""
    found = set()

    def resolve(anchor, names):
        if anchor == "crate":
            base = []
        elif anchor == "super":
            base = list(module[:-1])
        else:
            base = list(module)
        # `super::super::x`
        while names and names[0] == "super":
            base = base[:-1]
            names = names[1:]
        full = base + names
        for n in range(len(full), 0, -1):
            if tuple(full[:n]) in modules:
                if tuple(full[:n]) != module:
                    found.add(tuple(full[:n]))
                return

    for m in GROUP.finditer(text):
        prefix = [p for p in m.group(2).split("::") if p]
        for item in re.split(r",", m.group(3)):
            first = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", item)
            if first:
                resolve(m.group(1), prefix + first[:1])
    for m in PATH.finditer(text):
        resolve(m.group(1), [p for p in m.group(2).split("::") if p])
    # Paths relative to this module: `child::x` names a submodule.
    children = {c[len(module)] for c in modules if len(c) > len(module) and c[: len(module)] == module}
    for child in children:
        for m in re.finditer(r"(?<![:\w])" + re.escape(child) + r"((?:::[A-Za-z_][A-Za-z0-9_]*)+)", text):
            resolve("self", [child] + [p for p in m.group(1).split("::") if p])
        for m in re.finditer(r"(?<![:\w])" + re.escape(child) + r"::\{([^;]*?)\}", text, re.S):
            for item in m.group(1).split(","):
                first = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", item)
                if first:
                    resolve("self", [child] + first[:1])
    return found


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def name(crate, module):
    return crate + ("::" + "::".join(module) if module else "")


def self_test():
    """The reader on made-up crates: a loop through `use crate::`, one through a
    child and `super::`, and none where the imports only go down."""
    cases = [
        ({"lib.rs": "mod a; mod b;", "a.rs": "use crate::b::B;", "b.rs": "use crate::a::{A, X};"},
         [["a", "b"]]),
        ({"lib.rs": "mod p;", "p.rs": "mod c;\nfn f() { c::g() }", "p/c.rs": "use super::Shared;"},
         [["p", "p::c"]]),
        ({"lib.rs": "mod a; mod b;", "a.rs": "use crate::b::B;",
          "b.rs": "// crate::a::A in a comment\nconst S: &str = \"crate::a\";\n"
                  "#[cfg(test)]\nmod tests { use crate::a::A; }"},
         []),
    ]
    import tempfile
    for files, want in cases:
        with tempfile.TemporaryDirectory() as src:
            for path, text in files.items():
                os.makedirs(os.path.dirname(os.path.join(src, path)), exist_ok=True)
                with open(os.path.join(src, path), "w") as f:
                    f.write(text)
            modules = modules_of(src)
            graph = {}
            for module, path in modules.items():
                with open(path) as f:
                    graph[module] = targets(module, without_tests(f.read()), modules)
            got = [["::".join(m) for m in c] for c in cycles(graph)]
            if got != want:
                print("module-cycles self-test failed: {} gave {}, want {}".format(files, got, want))
                return 1
    print("module-cycles self-test: ok")
    return 0


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    allowed = set()
    if os.path.exists(ALLOWED):
        with open(ALLOWED) as f:
            allowed = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    found = []
    for crate, src in crate_sources():
        modules = modules_of(src)
        graph = {}
        for module, path in modules.items():
            with open(path) as f:
                text = without_tests(f.read())
            graph[module] = targets(module, text, modules)
        for component in cycles(graph):
            found.append(" ".join(name(crate, m) for m in component))
    new = [c for c in found if c not in allowed]
    stale = sorted(allowed - set(found))
    for c in found:
        print(("known loop (to untie): " if c in allowed else "NEW LOOP: ") + c)
    for c in stale:
        print("listed loop no longer found (remove it from scripts/module-cycles.allowed): " + c)
    if new or stale:
        return 1
    print("module-cycles: {} known loop(s), none new".format(len(found)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
