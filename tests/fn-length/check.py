#!/usr/bin/env python3
"""No function in src/ is over 80 lines (issue 13).

Counts each `fn` from its signature line to its closing brace, inclusive. Exempt: test code
(an item under `#[cfg(test)]`, and files declared as `#[cfg(test)] mod name;`) and generated
code (`include!`d from OUT_DIR, which is not under src/). Braces inside strings, chars and
comments are skipped.

    tests/fn-length/check.py [--max N] [--self-test] [ROOT]

Prints each offender as `path:line: fn name is N lines` and exits 1 if there is any.
"""
import os
import re
import sys

MAX = 80
FN = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:const\s+)?(?:async\s+)?(?:unsafe\s+)?"
                r"(?:extern\s+\"[^\"]*\"\s+)?fn\s+([A-Za-z_][A-Za-z0-9_]*)")
CFG_TEST = re.compile(r"^\s*#\[cfg\(test\)\]")
TEST_MOD_DECL = re.compile(r"^\s*#\[cfg\(test\)\]\s*\n\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;",
                           re.M)


def code_chars(text):
    """Yields (index, char) for characters outside comments, strings and char literals."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        if text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            continue
        m = re.match(r'b?r(#*)"', text[i:i + 20])
        if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            close = '"' + m.group(1)
            j = text.find(close, i + m.end())
            i = n if j < 0 else j + len(close)
            continue
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            continue
        if c == "'":
            m = re.match(r"'(?:\\.[^']*|[^\\'])'", text[i:i + 12])
            if m:  # a char literal; otherwise a lifetime
                i += m.end()
                continue
        yield i, c
        i += 1


def check_text(path, text, max_lines):
    """Returns the offenders in one file's text."""
    line_of = [0] * (len(text) + 1)
    line = 1
    for idx, ch in enumerate(text):
        line_of[idx] = line
        if ch == "\n":
            line += 1
    line_of[len(text)] = line
    lines = text.split("\n")
    # Brace pairs, from code characters only.
    open_at, stack, close_of = {}, [], {}
    code = list(code_chars(text))
    for idx, ch in code:
        if ch == "{":
            stack.append(idx)
        elif ch == "}" and stack:
            close_of[stack.pop()] = idx
    code_idx = [idx for idx, _ in code]
    code_set = {idx: ch for idx, ch in code}
    line_start = [0]
    for l in lines[:-1]:
        line_start.append(line_start[-1] + len(l) + 1)
    # Ranges exempt as test code: the item following #[cfg(test)].
    exempt = []
    offenders = []
    import bisect
    for no, l in enumerate(lines):
        start = line_start[no]
        is_test = CFG_TEST.match(l)
        m = FN.match(l)
        if not (is_test or m):
            continue
        if any(a <= start <= b for a, b in exempt):
            continue
        # The item's body: the first code `{` from here, unless a `;` comes first.
        k = bisect.bisect_left(code_idx, start + (len(l) if is_test else 0))
        body = None
        while k < len(code_idx):
            ch = code_set[code_idx[k]]
            if ch == ";" and not is_test:
                break
            if ch == "{":
                body = code_idx[k]
                break
            if ch == ";" and is_test:
                break
            k += 1
        if body is None or body not in close_of:
            continue
        end = close_of[body]
        if is_test:
            exempt.append((start, end))
            continue
        count = line_of[end] - (no + 1) + 1
        if count > max_lines:
            offenders.append(f"{path}:{no + 1}: fn {m.group(1)} is {count} lines")
    return offenders


def check_tree(root, max_lines):
    src = os.path.join(root, "src")
    test_files = set()
    for dirpath, _, files in os.walk(src):
        for f in files:
            if f.endswith(".rs"):
                p = os.path.join(dirpath, f)
                text = open(p, encoding="utf-8").read()
                base = dirpath if f in ("mod.rs", "lib.rs", "main.rs") else p[:-3]
                for name in TEST_MOD_DECL.findall(text):
                    test_files.add(os.path.join(base, name + ".rs"))
                    test_files.add(os.path.join(base, name, "mod.rs"))
    offenders = []
    for dirpath, _, files in os.walk(src):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            if not f.endswith(".rs") or p in test_files:
                continue
            text = open(p, encoding="utf-8").read()
            offenders += check_text(os.path.relpath(p, root), text, max_lines)
    return offenders


def self_test():
    """The check can fail: a long fn is reported, the same under #[cfg(test)] is not."""
    body = "\n".join(f'    let _x{i} = "{{"; // }}' for i in range(80))
    long_fn = f"pub async fn long_one() {{\n{body}\n}}\n"
    assert check_text("a.rs", long_fn, MAX) == ["a.rs:1: fn long_one is 82 lines"], \
        check_text("a.rs", long_fn, MAX)
    assert check_text("a.rs", "#[cfg(test)]\nmod tests {\n" + long_fn + "}\n", MAX) == []
    assert check_text("a.rs", "#[cfg(test)]\n" + long_fn, MAX) == []
    short = "fn f<'a>(x: &'a str) -> char {\n    let _ = '{';\n    '}'\n}\n"
    assert check_text("a.rs", short + long_fn, MAX) == ["a.rs:5: fn long_one is 82 lines"]
    assert check_text("a.rs", "trait T {\n    fn g(&self);\n}\n" + long_fn, MAX) \
        == ["a.rs:4: fn long_one is 82 lines"]
    print("fn-length self-test: 5 passed, 0 failed")


def main(argv):
    max_lines, root = MAX, os.path.join(os.path.dirname(__file__), "..", "..")
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--max":
            max_lines = int(args.pop(0))
        elif a == "--self-test":
            self_test()
            return 0
        else:
            root = a
    offenders = check_tree(os.path.normpath(root), max_lines)
    for o in offenders:
        print(o)
    if offenders:
        print(f"{len(offenders)} function(s) in src/ over {max_lines} lines", file=sys.stderr)
        return 1
    print(f"no function in src/ is over {max_lines} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
