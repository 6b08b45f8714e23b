"""The import contracts in pyproject.toml ([tool.importlinter]): they hold on this tree, and each of them
breaks on an import that violates it.

The violations are never written into the real tree: the contracts are copied, renamed from `callbot` to
`cbfake`, onto a skeleton namespace package in a temp directory (the rooms the contracts name, wired with
the arrows the design allows), one violating import is added, and `lint-imports` must report that very
contract broken. A contract with no violation case below fails `test_every_contract_has_a_violation_case`.
"""
from __future__ import annotations

import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
FAKE = "cbfake"  # the skeleton's namespace: never collides with the installed callbot


def _lint_imports() -> str:
    """The `lint-imports` of this interpreter's environment (the [test] extra installs it)."""
    beside = pathlib.Path(sys.executable).with_name("lint-imports")
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert found, "lint-imports is not installed (pip install '.[test]')"
    return found


def _config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]


def _run(config: pathlib.Path, cwd: pathlib.Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    # a wide console, so that no contract name is wrapped over two lines
    env = {**os.environ, "COLUMNS": "500"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([_lint_imports(), str(config), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def _verdicts(out: str) -> dict[str, str]:
    """contract name -> "KEPT" / "BROKEN", from lint-imports' summary lines."""
    return {m[1]: m[2] for m in re.finditer(r"^(.+?) (KEPT|BROKEN)$", out, re.MULTILINE)}


def test_contracts_hold_on_this_tree():
    out = _run(PYPROJECT, ROOT)
    verdicts = _verdicts(out.stdout)
    names = [c["name"] for c in _config()["contracts"]]
    broken = {n: v for n, v in verdicts.items() if v != "KEPT"}
    assert out.returncode == 0 and not broken, out.stdout + out.stderr
    assert sorted(verdicts) == sorted(names), out.stdout  # every contract was checked


def test_roots_are_every_top_level_package():
    """A package setup.py installs under callbot.<name> that is not a root is not analysed at all: a new
    subsystem folder (flows/, web/, ...) must be added to root_packages with it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    [packages] = [ast.literal_eval(node.value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Assign, ast.AnnAssign))
                  and any(getattr(t, "id", None) == "PACKAGES"
                          for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
    top_level = {name for name in packages if name.count(".") == 1 and name.startswith("callbot.")}
    assert set(_config()["root_packages"]) == top_level
    assert _config().get("include_external_packages") is True  # else mlx/pjsua2 cannot be forbidden


def test_ci_runs_the_contracts_before_the_tests():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    lint = [i for i, line in enumerate(lines) if "lint-imports" in line]
    tests = [i for i, line in enumerate(lines) if "pytest" in line and "pip" not in line]
    install = [i for i, line in enumerate(lines) if 'install' in line and '".[test]"' in line]
    assert lint and tests and install, lines
    assert install[0] < lint[0] < tests[0]


# --- the skeleton ------------------------------------------------------------------------------------

# The arrows the design allows, so that a violation can also be indirect (X -> allowed Y -> forbidden Z).
ALLOWED = {
    "callbot.engine": ["callbot.engine.audio"],
    "callbot.engine.serving": ["callbot.engine.audio", "callbot.engine.model", "callbot.engine.contract"],
    "callbot.engine.model": ["callbot.engine.audio"],
    "callbot.sip": ["callbot.engine.audio"],
    "callbot.app": ["callbot.sip", "callbot.engine", "callbot.engine.serving", "callbot.engine.model"],
    "callbot.app.recording": ["callbot.engine.audio"],
}

# (contract id, what it must catch, {module: [modules it imports]}, extra roots for the temp config)
VIOLATIONS = [
    ("engine-knows-no-sip-or-app", "engine -> app",
     {"callbot.engine.serving.bad": ["callbot.app"]}, []),
    ("engine-knows-no-sip-or-app", "engine -> pjsua2",
     {"callbot.engine.serving.bad": ["pjsua2"]}, []),
    ("engine-knows-no-sip-or-app", "engine -> sip",
     {"callbot.engine.model.bad": ["callbot.sip"]}, []),
    ("sip-sees-only-engine-audio", "sip -> serving",
     {"callbot.sip.bad": ["callbot.engine.serving"]}, []),
    ("sip-sees-only-engine-audio", "sip -> contract",
     {"callbot.sip.bad": ["callbot.engine.contract"]}, []),
    ("sip-sees-only-engine-audio", "sip -> app",
     {"callbot.sip.bad": ["callbot.app.recording"]}, []),
    ("sip-sees-only-engine-audio", "sip -> audio -> model (indirect)",
     {"callbot.engine.audio": ["callbot.engine.model"]}, []),
    ("engine-package-names-only-for-engine-and-app", "sip: from callbot.engine import Model (lazy name)",
     {"callbot.sip.bad": ["callbot.engine:Model"]}, []),
    ("no-mlx-on-the-sip-side", "sip -> mlx",
     {"callbot.sip.bad": ["mlx.core"]}, []),
    ("no-mlx-on-the-sip-side", "audio -> mlx",
     {"callbot.engine.audio.bad": ["mlx.core"]}, []),
    ("no-mlx-on-the-sip-side", "recording -> model -> mlx (indirect)",
     {"callbot.app.recording": ["callbot.engine.model"], "callbot.engine.model": ["mlx.core"]}, []),
    ("no-mlx-on-the-sip-side", "contract -> mlx",
     {"callbot.engine.contract": ["mlx"]}, []),
    ("model-below-serving", "model -> contract",
     {"callbot.engine.model.bad": ["callbot.engine.contract"]}, []),
    ("model-below-serving", "model -> serving",
     {"callbot.engine.model.bad": ["callbot.engine.serving"]}, []),
    ("engine-contract-is-a-leaf", "contract -> serving",
     {"callbot.engine.contract": ["callbot.engine.serving"]}, []),
    ("engine-contract-is-a-leaf", "contract -> audio",
     {"callbot.engine.contract": ["callbot.engine.audio.bad"]}, []),
    ("audio-is-the-bottom-room", "audio -> serving",
     {"callbot.engine.audio.bad": ["callbot.engine.serving"]}, []),
    ("model-and-serving-only-for-engine-and-app", "flows -> model",
     {"callbot.flows": ["callbot.engine.model"]}, ["callbot.flows"]),
    ("audio-only-for-engine-sip-and-app", "web -> audio",
     {"callbot.web": ["callbot.engine.audio"]}, ["callbot.web"]),
    ("sip-only-for-app", "analytics -> sip",
     {"callbot.analytics": ["callbot.sip"]}, ["callbot.analytics"]),
    ("analytics-and-store-stand-alone", "analytics.transcript -> speech",
     {"callbot.analytics.transcript": ["callbot.speech"]}, []),
    ("analytics-and-store-stand-alone", "store.queries -> app",
     {"callbot.store.queries": ["callbot.app"]}, []),
    ("later-subsystems-see-only-engine-contract", "flows.steps -> app -> model (indirect)",
     {"callbot.flows": [], "callbot.flows.steps": ["callbot.app"]}, ["callbot.flows"]),
    ("later-subsystems-see-only-engine-contract", "campaigns.dialer -> contract -> serving (indirect)",
     {"callbot.campaigns": [], "callbot.campaigns.dialer": ["callbot.engine.contract"],
      "callbot.engine.contract": ["callbot.engine.serving"]}, ["callbot.campaigns"]),
]


def _fake(name: str) -> str:
    return re.sub(r"^callbot(?=\.|$)", FAKE, name)


def _internal_modules(config: dict) -> set[str]:
    """Every module of ours the contracts name without a wildcard (they must exist in the skeleton)."""
    roots = tuple(r + "." for r in config["root_packages"]) + tuple(config["root_packages"])
    names = set(config["root_packages"])
    for contract in config["contracts"]:
        for key, value in contract.items():
            if isinstance(value, list):
                names |= {v for v in value if isinstance(v, str) and "*" not in v and v.startswith(roots)}
    return names


def _write_module(base: pathlib.Path, name: str, imports: list[str]) -> None:
    """`name` as a package (a/b/__init__.py) importing `imports` ("pkg.mod" or "pkg:Name" for a from-import)."""
    folder = base.joinpath(*_fake(name).split("."))
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for imp in imports:
        module, _, attr = imp.partition(":")
        lines.append(f"from {_fake(module)} import {attr}" if attr else f"import {_fake(module)}")
    init = folder / "__init__.py"
    init.write_text((init.read_text() if init.exists() else "") + "".join(line + "\n" for line in lines))


def _skeleton(base: pathlib.Path, config: dict, violation: dict[str, list[str]], extra_roots: list[str]) -> pathlib.Path:
    """The skeleton package in `base` and its contracts as an INI file; returns the file."""
    for name in sorted(_internal_modules(config) | set(ALLOWED) | set(violation) | set(extra_roots)):
        _write_module(base, name, ALLOWED.get(name, []))
    for name, imports in violation.items():
        _write_module(base, name, imports)
    assert not (base / FAKE / "__init__.py").exists()  # a namespace, like callbot

    def block(value) -> str:
        if isinstance(value, list):
            return "".join(f"\n    {_fake(v)}" for v in value)
        return _fake(value) if isinstance(value, str) else str(value)

    roots = [*config["root_packages"], *extra_roots]
    ini = [f"[importlinter]\nroot_packages ={block(roots)}\n"
           f"include_external_packages = {config.get('include_external_packages', False)}\n"]
    for contract in config["contracts"]:
        ini.append(f"\n[importlinter:contract:{contract['id']}]\n")
        for key, value in contract.items():
            if key != "id":
                ini.append(f"{key} = {block(value) if key != 'name' else value}\n")
    path = base / "contracts.ini"
    path.write_text("".join(ini))
    return path


def _names_by_id(config: dict) -> dict[str, str]:
    return {c["id"]: c["name"] for c in config["contracts"]}


def test_the_skeleton_keeps_every_contract(tmp_path):
    """Without a violation the skeleton passes: the cases below break a contract by their import alone."""
    config = _config()
    roots = ["callbot.flows", "callbot.analytics", "callbot.campaigns", "callbot.web"]
    ini = _skeleton(tmp_path, config, {}, roots)
    out = _run(ini, tmp_path, pythonpath=str(tmp_path))
    verdicts = _verdicts(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert set(verdicts.values()) == {"KEPT"} and len(verdicts) == len(config["contracts"]), out.stdout


@pytest.mark.parametrize("contract_id, what, violation, extra_roots", VIOLATIONS,
                         ids=[f"{v[0]}: {v[1]}" for v in VIOLATIONS])
def test_a_violation_breaks_its_contract(tmp_path, contract_id, what, violation, extra_roots):
    config = _config()
    name = _names_by_id(config).get(contract_id)
    assert name, f"no contract {contract_id!r} in pyproject.toml"
    ini = _skeleton(tmp_path, config, violation, extra_roots)
    out = _run(ini, tmp_path, pythonpath=str(tmp_path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert _verdicts(out.stdout).get(name) == "BROKEN", f"{what}: not caught\n{out.stdout}{out.stderr}"


def test_every_contract_has_a_violation_case():
    assert set(_names_by_id(_config())) <= {v[0] for v in VIOLATIONS}
