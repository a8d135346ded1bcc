"""docs/ARCHITECTURE.md stays true: its file table lists every tracked file of the code tree, every path
it names exists, and every function, class, method or C symbol its walk-through names is defined. Fails
when code moves or a file is added without a line in the table."""
import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
LISTED_TREES = ("tinyvllm/", "native/", "benchmarks/", "examples/", "tests/")
TICKED = re.compile(r"`([^`]+)`")


def tracked_files() -> set[str]:
    """The files the table must list: every tracked file under LISTED_TREES, tests/ without its test
    files (the helpers only), packages without their __init__.py."""
    out = subprocess.run(["git", "ls-files", *LISTED_TREES], cwd=ROOT, capture_output=True, text=True, check=True)
    return {f for f in out.stdout.splitlines()
            if not (f.startswith("tests/test_") or f.endswith("__init__.py"))}


def table_files(text: str) -> set[str]:
    """Paths in the first cell of the table rows. A ticked name whose first part is a folder of the root is
    a path from the root; any other is relative to the folder of the path before it in the same cell
    (`a/b/c.py`, `d.py`, `e/f.txt` -> a/b/d.py, a/b/e/f.txt). A name ending in '/' is a folder."""
    files = set()
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        folder = ""
        for name in TICKED.findall(line.split("|")[1]):
            if "/" in name and (ROOT / name.split("/")[0]).is_dir():
                path = name
                folder = name if name.endswith("/") else name.rsplit("/", 1)[0] + "/"
            else:
                path = folder + name
            files.add(path)
    return files


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def python_names():
    """Every class with its members (methods, class attributes, self.x assignments), and every function
    name (top-level or nested) and module stem, from the package's sources."""
    classes, functions, modules = {}, set(), {}
    for path in (ROOT / "tinyvllm").rglob("*.py"):
        tree = ast.parse(path.read_text())
        modules.setdefault(path.stem, set()).update(
            n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.add(node.name)
            elif isinstance(node, ast.ClassDef):
                members = classes.setdefault(node.name, set())
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        members.add(sub.name)
                    elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                        members.add(sub.target.id)
                    elif isinstance(sub, ast.Assign):
                        members.update(t.id for t in sub.targets if isinstance(t, ast.Name))
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store):
                        members.add(sub.attr)
    return classes, functions, modules


def c_names() -> set[str]:
    text = (ROOT / "native/include/tinyvllm.h").read_text()
    text += "".join(p.read_text() for p in (ROOT / "native/src").glob("*.*"))
    return set(re.findall(r"\b[A-Za-z_]\w*\b", text))


def unresolved(names, classes, functions, modules, cnames) -> list[str]:
    bad = []
    for name in names:
        name = name.removesuffix("()")
        if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
            continue  # code, a value or prose in ticks: not a name
        head, _, rest = name.partition(".")
        if rest:
            if "." in rest:
                ok = False
            elif head in classes:
                ok = rest in classes[head]
            else:
                ok = rest in modules.get(head, ())
        else:
            ok = name in classes or name in functions or name in cnames
        if not ok:
            bad.append(name)
    return bad


def test_the_file_table_lists_every_file():
    listed = table_files(DOC.read_text())
    missing = sorted(tracked_files() - listed)
    assert not missing, f"docs/ARCHITECTURE.md's table does not list {missing}"


def test_every_path_the_doc_names_exists():
    text = DOC.read_text()
    paths = table_files(text) | {n for n in TICKED.findall(text)
                                 if n.startswith(LISTED_TREES + ("docs/", "cross/")) and " " not in n}
    gone = sorted(p for p in paths if "*" not in p and not (ROOT / p).exists())
    assert not gone, f"docs/ARCHITECTURE.md names paths that do not exist: {gone}"


def test_the_walk_through_names_only_what_exists():
    walk = section(DOC.read_text(), "One request, top to bottom")
    names = [n for n in TICKED.findall(walk) if "/" not in n]
    assert len(names) >= 20  # the walk-through names the code it walks through
    bad = unresolved(names, *python_names(), c_names())
    assert not bad, f"the walk-through names what the code does not define: {bad}"


def test_the_checker_catches_a_moved_name():
    """The check itself can fail: a renamed method, a missing class, a bare name nobody defines."""
    classes, functions, modules = python_names()
    cnames = c_names()
    assert unresolved(["Scheduler.schedule", "tv_model_forward", "llm_engine.LLMEngine"],
                      classes, functions, modules, cnames) == []
    assert unresolved(["Scheduler.schedule_step", "NoSuchClass.forward", "no_such_function", "sampler.nothing"],
                      classes, functions, modules, cnames) == ["Scheduler.schedule_step", "NoSuchClass.forward",
                                                               "no_such_function", "sampler.nothing"]
