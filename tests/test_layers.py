"""The tree shows the layers: every library module imports only its own layer and the ones below (DESIGN.md)."""
import ast
from pathlib import Path

import pytest

from tests.paths import REPO

BELOW = {  # package -> the packages it may import besides itself
    "protos": set(),
    "model": set(),
    "hardware": {"model"},
    "kvtransfer": {"protos"},
    "prefill": {"model", "kvtransfer", "hardware"},
    "decode": {"model", "kvtransfer", "hardware"},
    "orchestrator.core": {"model", "hardware"},
    "orchestrator.client": {"protos", "model.finish"},  # of model, only the finish vocabulary (pure, no numpy)
    "orchestrator.simulator": {"orchestrator.core", "model", "hardware", "prefill", "decode"},
    "orchestrator.serving": {"orchestrator.core", "orchestrator.client", "orchestrator.logging_setup", "protos",
                             "model", "hardware", "kvtransfer", "prefill", "decode"},
}
NO_THIRD_PARTY = {"orchestrator.client": {"ray"}, "orchestrator.core": {"ray", "grpc"},
                  "orchestrator.simulator": {"ray", "grpc"}, "hardware": {"ray", "grpc"}}
OURS = ("protos", "model", "hardware", "kvtransfer", "prefill", "decode", "orchestrator", "bench")


def _within(module: str, name: str) -> bool:
    return module == name or module.startswith(name + ".")


def _layer(module: str) -> str | None:
    return next((name for name in sorted(BELOW, key=len, reverse=True) if _within(module, name)), None)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)  # `from orchestrator import client`


def _modules():
    for path in sorted(REPO.glob("**/*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] not in OURS or rel.parts[0] == "bench" or "_pb2" in rel.name:
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        if _layer(module):
            yield module, path


MODULES = list(_modules())


def test_every_library_package_is_covered():
    assert {_layer(m) for m, _ in MODULES} == set(BELOW)


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_respect_the_layers(module, path):
    layer = _layer(module)
    allowed = BELOW[layer] | {layer}
    for name in _imports(path):
        top = name.split(".")[0]
        if top in OURS:
            assert top != "bench" and (name + ".").split(".")[:2] != ["orchestrator", "cli"], f"library module {module} imports {name}"
            target = _layer(name) or (name if name == "orchestrator.logging_setup" else None)
            if target is None:  # `from orchestrator import client`: judged by its longer form
                continue
            assert target in allowed or any(_within(name, m) for m in allowed), f"{module} imports {name} (layer {target}); {layer} may import {sorted(allowed)}"
        assert top not in NO_THIRD_PARTY.get(layer, set()), f"{module} imports {name}"
