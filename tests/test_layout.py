"""The layout's rules (docs/architecture.md), checked so they stay true.

The import rules are read from the source with `ast`: nothing is imported or
executed, and lazy imports (inside functions) are seen too. One more test
installs the project without extras into a fresh venv and runs the verifier
there, which proves the client needs the base dependencies alone.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "verifier", "tlog", "witness")
BASE = {"cryptography", "rfc8785", "httpx", "pyhpke"}  # pyproject's base dependencies
# Server-side third-party packages: a base install must hold none of them.
SERVER = ("aiohttp", "orjson", "fastapi", "starlette", "uvicorn", "uvloop", "httptools", "redis",
          "psycopg", "dstack_sdk", "sigstore", "eth_keys", "Crypto", "dcap_qvl")
# Pure formats: bytes in, values or errors out; no I/O of any kind.
PURE = ("tlog.merkle", "tlog.note", "tlog.checkpoint", "tlog.tiles", "tlog.proof",
        "witness.cosignature", "witness.request", "verifier.receipt", "verifier.keyset_entry",
        "verifier.evidence_entry",
        "verifier.aci", "verifier.aci_v2", "verifier.sse", "verifier.tee")
PURE_THIRD_PARTY = {"cryptography", "rfc8785", "pyhpke", "dcap_qvl"}
IO = {"asyncio", "socket", "ssl", "selectors", "subprocess", "multiprocessing", "threading",
      "sqlite3", "http", "urllib.request", "pathlib", "tempfile", "shutil", "io", "logging",
      "signal", "fcntl", "ctypes", "importlib"}


@dataclass(frozen=True)
class Import:
    """One imported name, as written (`from a.b import c` is `a.b.c`)."""

    importer: str
    line: int
    name: str
    lazy: bool  # inside a function: runs only when called

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.name}" + (" (lazily)" if self.lazy
                                                                     else "")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_in(source: str, module: str, is_package: bool) -> list[Import]:
    """Every import statement in `source` (the text of `module`), relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    out: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend(Import(module, child.lineno, a.name, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module != "__future__":
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join([*parts[:len(parts) - child.level + 1], *filter(None, [base])])
                out.extend(Import(module, child.lineno, f"{base}.{a.name}", lazy)
                           for a in child.names)
            visit(child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(source), False)
    return out


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    return imports_in(path.read_text(), module, path.name == "__init__.py")


def target(name: str) -> str:
    """The project module an imported name lives in, else its top-level package."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return parts[0]


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names


IMPORTS = {m: imports_of(m) for m in MODULES}


def in_packages(*prefixes: str) -> list[Import]:
    return [i for m, imps in IMPORTS.items() if under(m, *prefixes) for i in imps]


def test_the_rules_see_every_module_and_resolve_imports() -> None:
    """Guards the checker itself: it finds the packages and resolves every import form."""
    assert {"gateway.api.pipeline", "verifier.tee.quote", "tlog.merkle",
            "witness.cosignature"} <= set(MODULES)
    source = ("import os.path\nfrom . import a\nfrom ..b import c as d\n"
              "class K:\n    import e\nasync def f():\n    from g.h import i\n")
    got = [(i.name, i.lazy) for i in imports_in(source, "gateway.api.pipeline", False)]
    assert got == [("os.path", False), ("gateway.api.a", False), ("gateway.b.c", False),
                   ("e", False), ("g.h.i", True)]
    assert [i.name for i in imports_in("from .x import y", "verifier.tee", True)] == [
        "verifier.tee.x.y"]
    assert target("tlog.merkle.HASH_SIZE") == "tlog.merkle"
    assert target("cryptography.hazmat.primitives") == "cryptography"
    lazy = [i for i in IMPORTS["verifier.tee.dcap"] if i.name == "dcap_qvl"]
    assert lazy and all(i.lazy for i in lazy)


def test_pure_formats_import_no_io() -> None:
    bad: list[str] = []
    for m in MODULES:
        if not under(m, *PURE):
            continue
        for i in IMPORTS[m]:
            t = target(i.name)
            if t in MODULES:
                if not under(t, *PURE) and t not in ("tlog", "witness", "verifier"):
                    bad.append(f"{i}: not a pure format")
            elif stdlib(t):
                if under(i.name, *IO) or under(i.name, "os") and i.name not in ("os",
                                                                                  "os.urandom"):
                    bad.append(f"{i}: I/O")
            elif t not in PURE_THIRD_PARTY:
                bad.append(f"{i}: not a format dependency")
        tree = ast.parse(MODULES[m].read_text())
        bad += [f"{m}:{n.lineno} uses os.{n.attr}" for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                and n.value.id == "os" and n.attr != "urandom"]
    assert bad == []


def test_pure_formats_hold_no_mutable_state() -> None:
    """No `global` statements and no module-level list, dict or set: constants only."""
    mutable = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
    bad: list[str] = []
    for m in MODULES:
        if not under(m, *PURE):
            continue
        tree = ast.parse(MODULES[m].read_text())
        bad += [f"{m}:{n.lineno} global" for n in ast.walk(tree)
                if isinstance(n, ast.Global | ast.Nonlocal)]
        bad += [f"{m}:{n.lineno} mutable module state" for n in tree.body
                if isinstance(n, ast.Assign | ast.AnnAssign) and isinstance(n.value, mutable)]
    assert bad == []


def test_the_log_and_witness_know_nothing_of_the_gateway_or_verifier() -> None:
    bad = [str(i) for i in in_packages("tlog", "witness") if under(i.name, "gateway", "verifier")]
    assert bad == []


def test_the_witness_shares_plumbing_not_the_logs_server() -> None:
    """The witness uses tlog's formats and tlog.service, never the log's own server parts."""
    allowed = ("tlog.merkle", "tlog.note", "tlog.checkpoint", "tlog.tiles", "tlog.proof",
               "tlog.service")
    bad = [str(i) for i in in_packages("witness")
           if under(i.name, "tlog") and not under(target(i.name), *allowed)]
    assert bad == []


def verifier_closure() -> set[str]:
    """Every project module `verifier` can load (top-level and lazy imports followed)."""
    seen: set[str] = set()
    pending = [m for m in MODULES if under(m, "verifier")]
    while pending:
        m = pending.pop()
        if m in seen:
            continue
        seen.add(m)
        pending += [t for i in IMPORTS[m] if (t := target(i.name)) in MODULES]
        pending += [p for p in (m.rpartition(".")[0],) if p]  # a package runs its __init__
    return seen


def test_the_verifier_imports_no_server_code() -> None:
    """Whatever the verifier can load needs only the base dependencies (dcap-qvl lazily)."""
    bad: list[str] = []
    reach = verifier_closure()
    bad += [f"verifier reaches {m}" for m in sorted(reach) if under(m, "gateway")]
    for m in sorted(reach):
        for i in IMPORTS[m]:
            t = target(i.name)
            if t in MODULES or stdlib(t):
                continue
            if t not in BASE and not (i.lazy and t == "dcap_qvl"):
                bad.append(str(i))
    assert bad == []
    assert {"tlog.note", "witness.cosignature", "verifier.tee.quote"} <= reach


def test_only_the_gateway_command_imports_the_demo() -> None:
    bad = [str(i) for i in in_packages(*PACKAGES)
           if under(i.name, "gateway.demo") and not under(i.importer, "gateway.demo")
           and i.importer != "gateway.__main__"]
    assert bad == []


# What each gateway sub-package may import of the gateway (its __init__ docstring says so).
GATEWAY_RULES: dict[str, tuple[str, ...]] = {
    "gateway.identity": ("gateway.identity",),
    "gateway.upstream": ("gateway.upstream", "gateway.verification", "gateway.api.errors",
                         "gateway.api.config"),
    "gateway.receipts": ("gateway.receipts",),
    "gateway.verification": ("gateway.verification",),
    "gateway.api": ("gateway.api", "gateway.identity", "gateway.upstream",
                    "gateway.verification", "gateway.receipts"),
}


def test_gateway_subpackages_import_only_what_their_docstrings_allow() -> None:
    bad = [f"{i} (allowed: {', '.join(allowed)})"
           for pkg, allowed in GATEWAY_RULES.items() for i in in_packages(pkg)
           if under(i.name, "gateway") and not under(target(i.name), *allowed)]
    assert bad == []


def test_every_package_says_what_it_owns_and_may_import() -> None:
    packages = [m for m, p in MODULES.items() if p.name == "__init__.py"]
    missing = [m for m in packages
               if "import" not in (ast.get_docstring(ast.parse(MODULES[m].read_text())) or "")]
    assert missing == []
    assert set(GATEWAY_RULES) | {"gateway.demo"} == {m for m in packages
                                                      if m.startswith("gateway.")}


IMPORT_NAME = {"pycryptodome": "Crypto",  # distributions imported under another name
               "opentelemetry-api": "opentelemetry"}


def declared() -> dict[str, list[str]]:
    """pyproject's base and `server` dependencies, as the names the code imports."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out: dict[str, list[str]] = {}
    for group, reqs in (("base", project["dependencies"]),
                        ("server", project["optional-dependencies"]["server"])):
        dists = [re.split(r"[\[<>=!~;\s]", r, maxsplit=1)[0].lower() for r in reqs]
        out[group] = [IMPORT_NAME.get(d, d.replace("-", "_")) for d in dists]
    return out


def test_every_dependency_is_used_and_every_import_declared() -> None:
    """No declared dependency without a use; no third-party import left undeclared."""
    deps = declared()
    assert set(deps["base"]) == BASE
    used = {target(i.name) for imps in IMPORTS.values() for i in imps}
    third_party = {t for t in used if t not in MODULES and not stdlib(t)}
    declared_names = set(deps["base"]) | set(deps["server"])
    assert sorted(declared_names - third_party) == []  # declared, never imported
    assert sorted(third_party - declared_names) == []  # imported, never declared


VERIFIER_CHECK = textwrap.dedent("""
    import importlib, importlib.resources, importlib.util, sys
    names = sys.argv[1:]
    for name in names:
        importlib.import_module(name)
    import verifier
    assert "site-packages" in verifier.__file__, verifier.__file__
    loaded = [m for m in sys.modules if m.split(".")[0] in {server} | {{"gateway"}}]
    installed = [n for n in {server} if importlib.util.find_spec(n) is not None]
    assert not loaded, f"server code loaded: {{loaded}}"
    assert not installed, f"server packages installed: {{installed}}"
    assert importlib.resources.files("verifier").joinpath("dashboard.html").is_file()
    from verifier import receipt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Ed25519PrivateKey.generate()
    salt = receipt.new_salt()
    body = {{"v": receipt.VERSION, "id": "0" * 32, "time": "2026-01-01T00:00:00.000Z",
             "gateway": {{}}, "request_hash": receipt.digest(salt, b"q"),
             "forwarded_hash": None, "route": {{}}, "upstream": {{"verified": False}},
             "provider_request_hash": None, "provider_response_hash": None,
             "response_hash": receipt.digest(salt, b"a"), "e2ee": {{"mode": "none"}},
             "keyset_index": 0}}
    signed = receipt.sign(body, key)
    assert receipt.verify(signed) == key.public_key().public_bytes_raw()
    print(len(names), "modules imported")
""").format(server=set(SERVER))


def test_verifier_installs_and_runs_on_the_base_dependencies_alone(tmp_path: Path) -> None:
    """`pip install .` (no extras) in a fresh venv; every verifier module imports there,
    no server package is installed or loaded, and `python -m verifier --help` works."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts:
                dest = src / p.relative_to(ROOT)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(p.read_bytes())
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=env)
    py = str(venv / "bin" / "python")
    pip = subprocess.run([py, "-m", "pip", "install", "--quiet", str(src)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    if pip.returncode != 0 and ("No matching distribution" in pip.stderr
                                or "Could not find a version" in pip.stderr):
        pytest.skip(f"pip cannot reach a package index here: {pip.stderr.strip()[-300:]}")
    assert pip.returncode == 0, pip.stderr[-3000:]
    names = sorted(m for m in MODULES if under(m, "verifier") and not m.endswith("__main__"))
    run = subprocess.run([py, "-I", "-c", VERIFIER_CHECK, *names], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == f"{len(names)} modules imported"
    cli = subprocess.run([py, "-I", "-m", "verifier", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "usage: python -m verifier" in cli.stdout
