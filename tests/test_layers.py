"""The house rules of the layout (DESIGN.md, Layers), checked from the source with `ast`.

1. A job is a page and imports no other job; only the faces (the CLI, the demo, the dataset alias scripts)
   import jobs. A job is a module of pipelines/ with a top-level `add_arguments` and `run`.
2. Only pipelines/mlflow_* import mlflow.  3. Only pipelines/ray_* import ray; ddpm_core imports neither,
   nor pipelines.  5. Every error class subclasses ddpm_core.errors.UserError, and exactly one function
   (pipelines.job_runner.run_job) turns an error into exit status 2.
Sizes: no function in pipelines/ longer than 60 lines, no class longer than 150, every job under 300 lines.
Each check is a function of {module name: source}, so a test can show it failing on a planted violation.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACES = {"pipelines.cli", "pipelines.demo", "pipelines.shard_lsun", "pipelines.shard_celebahq",
         "pipelines.train_lsun", "pipelines.train_celebahq"}
EXIT_PATH = "pipelines.job_runner.run_job"


def sources() -> dict[str, str]:
    found = {}
    for package in ("ddpm_core", "pipelines"):
        for path in sorted((ROOT / package).glob("*.py")):
            name = f"{package}.{path.stem}" if path.stem != "__init__" else package
            found[name] = path.read_text()
    return found


def imports(tree: ast.AST) -> set[str]:
    """Every module a source imports (at any depth: lazy imports count), by its full dotted name."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = "ddpm_core." + node.module if node.level else node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def is_job(tree: ast.Module) -> bool:
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    return {"add_arguments", "run"} <= defined


def layer_violations(code: dict[str, str]) -> list[str]:
    trees = {name: ast.parse(source) for name, source in code.items()}
    jobs = {name for name, tree in trees.items() if name.startswith("pipelines.") and is_job(tree)}
    found = []
    for name, tree in trees.items():
        used = imports(tree)
        top = {module.split(".")[0] for module in used}
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("ddpm_core") and top & {"ray", "mlflow", "pipelines"}:
            found.append(f"{name} imports {sorted(top & {'ray', 'mlflow', 'pipelines'})}: ddpm_core stands alone")
        if "mlflow" in top and not leaf.startswith("mlflow_"):
            found.append(f"{name} imports mlflow: only pipelines/mlflow_* may")
        if "ray" in top and not leaf.startswith("ray_"):
            found.append(f"{name} imports ray: only pipelines/ray_* may")
        if name not in FACES and (used & jobs) - {name}:
            found.append(f"{name} imports the job(s) {sorted((used & jobs) - {name})}: only the faces may")
    return found


def error_violations(code: dict[str, str]) -> list[str]:
    """Error classes outside UserError's tree, and exit-status-2 paths other than run_job."""
    bases: dict[str, list[str]] = {}
    found = []
    for name, source in code.items():
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [getattr(base, "id", getattr(base, "attr", "")) for base in node.bases]
            if isinstance(node, ast.FunctionDef):
                returns_2 = any(isinstance(inner, ast.Return) and isinstance(inner.value, ast.Constant)
                                and inner.value.value == 2 for inner in ast.walk(node))
                exits_2 = any(isinstance(inner, ast.Call) and getattr(inner.func, "attr", "") == "exit"
                              and inner.args and isinstance(inner.args[0], ast.Constant) and inner.args[0].value == 2
                              for inner in ast.walk(node))
                if (returns_2 or exits_2) and f"{name}.{node.name}" != EXIT_PATH:
                    found.append(f"{name}.{node.name} gives exit status 2: only {EXIT_PATH} may")

    def is_user_error(cls: str, seen: frozenset = frozenset()) -> bool:
        return cls == "UserError" or any(base in bases and base not in seen and is_user_error(base, seen | {cls})
                                         for base in bases.get(cls, []))

    found += [f"{cls} is not a UserError" for cls in bases
              if cls.endswith("Error") and cls != "UserError" and not is_user_error(cls)]
    return found


def size_violations(code: dict[str, str]) -> list[str]:
    found = []
    for name, source in code.items():
        if not name.startswith("pipelines"):
            continue
        tree = ast.parse(source)
        if is_job(tree) and len(source.splitlines()) >= 300:
            found.append(f"job {name} has {len(source.splitlines())} lines (at most 299)")
        for node in ast.walk(tree):
            length = (node.end_lineno or node.lineno) - node.lineno + 1 if hasattr(node, "lineno") else 0
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and length > 60:
                found.append(f"{name}.{node.name} has {length} lines (at most 60)")
            if isinstance(node, ast.ClassDef) and length > 150:
                found.append(f"class {name}.{node.name} has {length} lines (at most 150)")
    return found


def test_the_layout_keeps_its_rules():
    code = sources()
    assert layer_violations(code) == []
    assert error_violations(code) == []
    assert size_violations(code) == []


def test_each_check_catches_a_planted_violation():
    """The checks can fail: each rule broken once in a copy of today's sources."""
    code = sources()
    train, sample = code["pipelines.train"], code["pipelines.sample_fid"]
    planted = {
        "pipelines.train": "import mlflow\n" + train,  # rule 2
        "pipelines.sample_fid": sample + "\n\ndef _cluster():\n    import ray\n",  # rule 3, lazily
        "pipelines.shard": code["pipelines.shard"] + "\nfrom pipelines.train import RESUMABLE\n",  # rule 1
        "ddpm_core.ema": "import pipelines\n" + code["ddpm_core.ema"],
    }
    assert sorted(layer_violations({**code, **planted})) == sorted([
        "pipelines.train imports mlflow: only pipelines/mlflow_* may",
        "pipelines.sample_fid imports ray: only pipelines/ray_* may",
        "pipelines.shard imports the job(s) ['pipelines.train']: only the faces may",
        "ddpm_core.ema imports ['pipelines']: ddpm_core stands alone",
    ])
    errors = {**code, "pipelines.shard": code["pipelines.shard"] + (
        "\n\nclass PlanError(ValueError):\n    pass\n\n\ndef main2(args):\n    try:\n        return run(args)\n"
        "    except PlanError:\n        return 2\n")}
    assert sorted(error_violations(errors)) == ["PlanError is not a UserError",
                                                "pipelines.shard.main2 gives exit status 2: only "
                                                f"{EXIT_PATH} may"]
    long_function = "def long():\n" + "    x = 1\n" * 61
    assert size_violations({**code, "pipelines.shard": code["pipelines.shard"] + "\n\n" + long_function}) == [
        "pipelines.shard.long has 62 lines (at most 60)"]
