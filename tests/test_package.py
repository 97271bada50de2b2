"""The package as a whole: its import graph points down only, `fnclass --help` does not load torch, and a wheel
installed into a fresh venv trains from an empty folder with the shipped default config."""

import ast
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at the top or inside functions: lazy imports count too)."""
    name = package_dir.name
    modules = {}
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name.split(".")[0] == name}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == name:
                for alias in node.names:  # `from pkg.a import b` imports pkg.a.b when that is a module
                    submodule = f"{node.module}.{alias.name}"
                    edges.add(submodule if submodule in modules else node.module)
        graph[module] = {edge for edge in edges if edge in modules and edge != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, as the list of modules along it (depth-first search)."""
    found, state = [], {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                found.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_no_module_of_fnclass_imports_one_that_imports_it_back():
    graph = import_graph(ROOT / "fnclass")
    assert len(graph) > 20 and "fnclass.training.step" in graph["fnclass.training.program"]
    assert cycles(graph) == []


def test_the_import_check_finds_a_circle_even_through_a_lazy_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub import leaf\n")
    (package / "sub" / "leaf.py").write_text("import os\n")
    (package / "low.py").write_text("def f():\n    from pkg import high\n")  # lazy, inside a function
    (package / "high.py").write_text("from pkg.low import f\nfrom pkg.sub import leaf\n")
    graph = import_graph(package)
    assert graph["pkg.high"] == {"pkg.low", "pkg.sub.leaf"} and graph["pkg.sub"] == {"pkg.sub.leaf"}
    assert cycles(graph) == [["pkg.high", "pkg.low", "pkg.high"]]


def _loads_torch(code: str, env: dict | None = None) -> tuple[bool, str]:
    """Run ``code`` in a fresh interpreter; whether torch was imported by the end, and what it printed."""
    probe = f"import sys\ntry:\n{''.join('    ' + line + chr(10) for line in code.splitlines())}" \
            "except SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=120)
    return done.stderr.strip().splitlines()[-1] == "TORCH", done.stdout


def test_help_and_shell_completion_do_not_import_torch():
    loads, out = _loads_torch("from fnclass.cli import main\nmain(['--help'])")
    assert not loads and "train" in out and "config" in out
    loads, out = _loads_torch("from fnclass.cli import main\nmain(['train', '--help'])")
    assert not loads and "--config" in out
    loads, out = _loads_torch("from fnclass.cli import main\nmain(prog_name='fnclass')",
                              {"_FNCLASS_COMPLETE": "bash_complete", "COMP_WORDS": "fnclass tr", "COMP_CWORD": "1"})
    assert not loads and "train" in out
    loads, _ = _loads_torch("import fnclass.training.step\nfrom fnclass.cli import main\nmain(['info', '--help'])")
    assert loads  # the probe can see torch when it is loaded


def test_cli_choices_agree_with_the_library():
    from fnclass import data
    from fnclass.cli import data as cli_data
    from fnclass.cli import export as cli_export
    from fnclass.run import export

    assert cli_export.FORMATS == export.FORMATS and cli_export.DTYPES == tuple(export.DTYPES)
    assert cli_data.DEFAULT_TEST_FRACTION == data.DEFAULT_TEST_FRACTION


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_trains_from_an_empty_folder(cifar_dir, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, timeout=300)
    # The venv sees the dependencies already installed here (torch is large), but fnclass only from the wheel.
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False)
    python = tmp_path / "venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing may point back at the checkout
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    str(next(wheels.glob("fnclass-*.whl")))], check=True, timeout=300, env=env)
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run([str(python), "-c", "import fnclass.config as c; print(c.__file__); "
                            "print(c.shipped_configs()['cpu'])"], capture_output=True, text=True, cwd=empty,
                           check=True, env=env).stdout.split()
    assert all(str(tmp_path / "venv") in line for line in where), where  # not the checkout
    fnclass_cli = tmp_path / "venv" / "bin" / "fnclass"
    data_dir = str(cifar_dir.resolve())  # FNCLASS_DATA may be relative to the checkout; this runs elsewhere
    done = subprocess.run([str(fnclass_cli), "train", "--device", "cpu", "--data-dir", data_dir, "--no-download",
                           "--set", "data.train_limit=1000", "--set", "data.test_limit=256", "--set", "train.epochs=1",
                           "--out", "run", "--json"], capture_output=True, text=True, cwd=empty, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["steps"] == 2 and summary["model"] == "tiny"  # the shipped cpu config: tiny, batch 500
    assert (empty / "run" / "summary.json").is_file() and (empty / "run" / "config.toml").is_file()
    assert "no --config given: using the shipped cpu config" not in done.stdout  # --json prints only the summary
    zoo = subprocess.run([str(fnclass_cli), "models", "--json"], capture_output=True, text=True, cwd=empty,
                         check=True, env=env).stdout  # the pretrained weights install with the package
    assert [entry["name"] for entry in json.loads(zoo)] == ["cifar10-cpu"]
    predicted = subprocess.run([str(fnclass_cli), "eval", "--model", "cifar10-cpu", "--data-dir", data_dir, "--limit",
                                "500", "--json"], capture_output=True, text=True, cwd=empty, env=env)
    assert predicted.returncode == 0 and json.loads(predicted.stdout)["accuracy"] > 0.8, predicted.stderr
    shown = subprocess.run([str(fnclass_cli), "config", "show", "--config", "fast95"], capture_output=True, text=True,
                           cwd=empty, check=True, env=env).stdout
    assert "widths = [128, 384, 384]" in shown and "whiten = true" in shown  # fast95 = fast + its differences
