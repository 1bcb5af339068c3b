"""`plan` takes its trace from cluster.yaml through the one config loader (its path rules, its errors)."""
import argparse
import shutil
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import UserError
from orchestrator.cli.plan import _trace_path
from tests.paths import REPO


def _args(config: Path, trace: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(config=str(config), trace=trace)


def test_trace_comes_from_the_config_relative_to_its_folder(tmp_path):
    tree = yaml.safe_load((REPO / "cluster.yaml").read_text())
    tree["metadata"]["workload"]["trace"] = "data/t.csv"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    assert _trace_path(_args(cfg)) == (tmp_path / "data" / "t.csv").resolve()
    assert _trace_path(_args(cfg, trace="other.csv")) == Path("other.csv")


def test_a_bad_config_is_the_loaders_file_key_reason(tmp_path):
    cfg = tmp_path / "c.yaml"
    shutil.copy(REPO / "cluster.yaml", cfg)
    tree = yaml.safe_load(cfg.read_text())
    del tree["metadata"]["workload"]["trace"]
    cfg.write_text(yaml.safe_dump(tree))
    with pytest.raises(UserError) as e:
        _trace_path(_args(cfg))
    assert str(e.value) == f"{cfg}: metadata.workload.trace: missing (or pass --trace)"
    with pytest.raises(UserError, match=r"nope.yaml: config file not found \(or pass --trace\)"):
        _trace_path(_args(tmp_path / "nope.yaml"))
