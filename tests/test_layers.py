"""The package's layers, checked: no module imports from a layer above its own.

Every `import` / `from ... import` in dpag_engine/ and kernels/ (installed as dpag_engine.kernels),
function-level imports included, is read with `ast` (nothing is imported). A module missing from
LAYERS fails the test: a new module must say where it stands.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. Within a layer modules may import each other; across layers only downwards.
LAYERS = [
    # 0 foundations: configuration, maths with no model, data formats, kinematics, logs, the C++ module
    {"config", "progress", "normalize", "losses", "rtc", "diffusion", "kinematics", "runlog", "data", "_C",
     "spec", "render"},
    {"ops", "kernels"},                                   # 1 per-op backends (torch, cpp, triton)
    {"guidance", "model"},                                # 2 the networks and the latent update
    {"planner", "policy"},                                # 3 the policy and the plan contract
    {"checkpoint", "export", "runtime"},                  # 4 files and runtimes
    {"training", "train", "envs", "tasks", "eval", "robot", "cameras", "gripper", "cell", "spec_io", "rig", "teleop"},  # 5 training, tasks, the cell's hardware
    {"ursim"},                                            # 6 the controller emulator
    {"serve", "session", "demo", "record"},               # 7 applications
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules():
    """(top-level name under dpag_engine, file, dotted package of the file) for every source file."""
    for f in sorted((ROOT / "dpag_engine").rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts        # ("dpag_engine", "x", ...)
        yield parts[1], f, ".".join(parts[:-1])
    for f in sorted((ROOT / "kernels").rglob("*.py")):        # installed as dpag_engine.kernels
        yield "kernels", f, "dpag_engine.kernels"


def imported_tops(path: Path, package: str):
    """The dpag_engine top-level names a file imports (relative imports resolved from its package)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target + "." + a.name for a in node.names] if not node.module else [target]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "dpag_engine" and len(parts) > 1:
                yield parts[1], node.lineno


def test_every_module_has_a_layer():
    missing = sorted({top for top, _, _ in modules() if top not in ("__init__", "__main__") and top not in LAYER})
    assert not missing, f"modules with no layer in tests/test_layers.py: {missing}"


def test_nothing_imports_upward():
    upward = []
    for top, path, package in modules():
        if top in ("__init__", "__main__"):   # the package's own entry points may reach anything
            continue
        for target, line in imported_tops(path, package):
            if target in LAYER and LAYER[target] > LAYER[top]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({top}, layer {LAYER[top]}) imports "
                              f"{target} (layer {LAYER[target]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_emulator_and_the_robot_driver_load_without_torch():
    """The emulator runs in its own process, and starting it must not cost torch's ~1 s and ~200 MB
    (dpag_engine/__init__.py names its exports lazily for this)."""
    import subprocess
    import sys
    code = "import sys, dpag_engine.ursim, dpag_engine.kinematics, dpag_engine.runlog; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
