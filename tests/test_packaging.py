"""quantkit as an installed library: a wheel built from this checkout works outside it, and the
package declares what it imports.

The wheel test installs the wheel into a fresh venv that sees the test venv's installed
dependencies (a .pth line to its site-packages, whose own .pth files, the editable quantkit
among them, are not processed) but not its quantkit: what runs there is the wheel's content.
Whether the dependency declarations are complete is proved separately, from the source.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "quantkit"
# Declared but not imported by quantkit, and why each is still needed at run time.
NEEDED_UNIMPORTED = {
    "compressed-tensors": "transformers loads compressed-tensors checkpoints with it (quantkit eval)",
    "accelerate": "transformers needs it for device_map='auto' (self-generated calibration on CUDA)",
}
_COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", "build", "*.egg-info", ".pytest_cache", "out",
                                      ".whl", ".ipynb_checkpoints")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _normalize(re.match(r"[A-Za-z0-9._-]+", spec).group(0))


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _imported_modules() -> set[str]:
    """Top-level names of every absolute import in quantkit/ (module- or function-level)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"quantkit"}


def test_every_third_party_import_is_a_declared_dependency():
    project = _pyproject()["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {_requirement_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    distributions = importlib.metadata.packages_distributions()
    imported_dists = set()
    for module in sorted(_imported_modules()):
        dists = {_normalize(d) for d in distributions.get(module, [module])}
        assert dists & (core | extras), f"quantkit imports {module} ({', '.join(dists)}); pyproject does not declare it"
        imported_dists |= dists
    unused = core - imported_dists - set(NEEDED_UNIMPORTED)
    assert not unused, f"declared but never imported (and not needed at run time): {sorted(unused)}"


def test_torch_is_not_pinned_for_users_but_the_install_script_pins_it():
    torch_reqs = [r for r in _pyproject()["project"]["dependencies"] if _requirement_name(r) == "torch"]
    assert torch_reqs and not any("==" in r for r in torch_reqs), torch_reqs
    assert re.search(r"pip install -q torch==\d+\.\d+\.\d+", (ROOT / "scripts" / "install.sh").read_text())


def _package_imports() -> dict[str, set[str]]:
    """quantkit module -> the quantkit modules it imports anywhere (lazy imports included;
    the package root, a facade of lazy imports, left out)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                base = base if node.level else node.module or ""
                edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
        graph[name] = {e for e in edges if e in modules and e not in ("quantkit", name)}
    return graph


def test_no_import_cycles_between_quantkit_modules():
    graph = _package_imports()
    assert graph["quantkit.plan_cli"] >= {"quantkit.planner"}  # the walk sees imports at all
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path[path.index(nxt):] + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A venv outside the checkout holding only the wheel built from it (plus the test venv's
    dependencies, reached through a .pth line)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=_COPY_IGNORE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(work / "dist"), str(src)], check=True, cwd=work)
    (wheel,) = (work / "dist").glob("quantkit-*.whl")
    env = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, cwd=work)
    (site / "test_venv_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


def _in_env(env: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(env / "bin" / "python"), *args], cwd=cwd, env=environ, capture_output=True, text=True)


def test_wheel_outside_the_checkout_validates_and_runs_a_shipped_recipe(wheel_env, tmp_path):
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", layers=1, hidden=128, intermediate=256)  # the recipe's 128 x 256 tokens
    where = _in_env(wheel_env, tmp_path, "-c", "import quantkit; print(quantkit.__file__)")
    assert where.returncode == 0, where.stderr
    # The wheel's quantkit, not the checkout's.
    assert Path(where.stdout.strip()).is_relative_to(wheel_env), where.stdout
    out = tmp_path / "out"
    # The shipped default recipe with its default calibration and evaluation sets, on a tiny model.
    args = ("smollm2-gptq", "--model", str(model), "--output-dir", str(out))
    validate = _in_env(wheel_env, tmp_path, "-m", "quantkit", "validate", "--json", *args)
    assert validate.returncode == 0, validate.stderr
    plan = json.loads(validate.stdout)["plan"]
    assert (plan["calibration"]["source"], plan["calibration"]["kind"]) == ("shakespeare", "shipped")
    assert (plan["evaluate"]["source"], plan["evaluate"]["kind"]) == ("shakespeare-eval", "shipped")
    run = _in_env(wheel_env, tmp_path, "-m", "quantkit", "--quiet", "run", *args)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["source"] == "shakespeare" and report["calibration"]["num_samples"] > 0
    assert report["evaluation"]["source"] == "shakespeare-eval"
    assert "quantization_config" in json.loads((out / "config.json").read_text())
