"""The `gemmakit` command as a user runs it: a real subprocess, the real default model.
Run: .venv/bin/python -m pytest tests/test_cli.py
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from gemmakit.config import param_counts
from gemmakit.registry import REGISTRY, config_for


def gemmakit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_help_lists_the_verbs():
    """`gemmakit --help` names every verb."""
    out = gemmakit("--help")
    assert out.returncode == 0 and "models" in out.stdout and "generate" in out.stdout


def test_models_lists_every_variant_with_its_size():
    """`gemmakit models` prints every registry entry with the computed size and the MoE active count."""
    out = gemmakit("models")
    assert out.returncode == 0
    for name in REGISTRY:
        total = param_counts(config_for(name))["total"]
        line = next(line for line in out.stdout.splitlines() if line.startswith(name + " "))
        assert (f"{total / 1e9:.2f}B" if total >= 0.95e9 else f"{total / 1e6:.0f}M") in line
    assert "3.82B active" in out.stdout and "30.70B" in out.stdout


def test_generate_on_the_default_model_is_greedy_and_deterministic(default_model):
    """The main job: a greedy completion on the embedded 270M, the same text twice."""
    runs = [gemmakit("generate", "The capital of France is", "--max-tokens", "8") for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout.startswith("The capital of France is") and len(runs[0].stdout) > 30
    assert runs[0].stdout == runs[1].stdout


def test_seeded_sampling_repeats(default_model):
    """--temperature with --seed gives the same sample each time."""
    args = ("generate", "Once upon a time", "--max-tokens", "8", "--temperature", "1.0", "--seed", "7")
    assert gemmakit(*args).stdout == gemmakit(*args).stdout


@pytest.mark.parametrize("args,message", [
    (("generate", "x", "--temperature", "-1"), "temperature must be in"),
    (("generate", "x", "--max-tokens", "0"), "max_tokens must be at least 1"),
    (("generate", "x", "--model", "/no/such/model"), "no such model path"),
    (("generate", "x", "--max-tokens", "40000"), "exceeds the context of 8192"),
    (("generate", "x", "--max-tokens", "40000", "--context", "65536"), "exceeds the context of 32768"),
    (("generate", "x", "--top-p", "1.5"), "top_p"),
    (("generate", "x", "--quantize", "int3"), "invalid choice"),
    (("serve", "--model", "/no/such/model", "--port", "0"), "no such model path"),
])
def test_bad_input_is_one_clear_error_line(default_model, args, message):
    """Bad arguments exit with status 2 and an `error:` line, never a traceback or partial output."""
    out = gemmakit(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_damaged_gguf_is_reported_by_the_cli(default_model, tmp_path):
    """A truncated download given with --model says so."""
    cut = tmp_path / "cut.gguf"
    with open(default_model, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    out = gemmakit("generate", "x", "--model", str(cut))
    assert out.returncode == 2 and "truncated" in out.stderr and "Traceback" not in out.stderr


def test_bench_prints_a_table(default_model):
    """`gemmakit bench` measures the engine and prints rates, memory and the roofline fraction, and a memory
    forecast for --context, capped at the model's own context as the engines cap it."""
    out = gemmakit("bench", "--batch", "1", "2", "--prompt-len", "16", "--new-tokens", "4", "--quantize", "int8",
                   "--context", "100000")
    assert out.returncode == 0, out.stderr
    assert "memory bandwidth" in out.stdout and "| roofline |" in out.stdout
    assert "Q4_K x " in out.stdout and "decoded, then int8" in out.stdout  # the GGUF's types, as loaded
    assert len([line for line in out.stdout.splitlines() if line.startswith("| auto | int8 |")]) == 2
    assert "memory estimate at --context 32768 (capped at the model's 32768), batch 2:" in out.stdout


def test_bench_prints_the_plan_its_largest_engine_made(default_model, monkeypatch, capsys):
    """`gemmakit bench` prints the plan of its largest engine as that engine made it, rather than planning once
    more: a second plan would time a quantized head's screen again where the plan times it (AVX2 kernels)."""
    from gemmakit.cli import main
    from gemmakit.runtime import plan, steps

    made, real = [], plan.make_plan

    def counted(model, max_batch, *args, **kwargs):
        made.append((max_batch, real(model, max_batch, *args, **kwargs)))
        return made[-1][1]

    monkeypatch.setattr(plan, "make_plan", counted)
    monkeypatch.setattr(steps, "make_plan", counted)
    assert main(["bench", "--batch", "1", "2", "--prompt-len", "8", "--new-tokens", "2", "--quantize", "int4",
                 "--compile", "off"]) == 0
    out = capsys.readouterr().out
    assert [batch for batch, _ in made] == [1, 2]  # one plan an engine, none besides
    assert made[1][1].describe() in out.splitlines()


def test_compile_policy_per_verb(monkeypatch):
    """auto compiles `bench` and long `generate` runs but not short ones or `chat` (its prompt must come up in
    seconds); --compile and GEMMAKIT_COMPILE override; a bad value is a clear error."""
    from gemmakit.cli import build_parser, wants_compile

    monkeypatch.delenv("GEMMAKIT_COMPILE", raising=False)
    parse = build_parser().parse_args
    assert wants_compile(parse(["generate", "x", "--max-tokens", "512"])) and wants_compile(parse(["bench"]))
    assert not wants_compile(parse(["chat"])) and not wants_compile(parse(["generate", "x"]))
    assert wants_compile(parse(["chat", "--compile", "on"]))
    assert not wants_compile(parse(["generate", "x", "--compile", "off"]))
    monkeypatch.setenv("GEMMAKIT_COMPILE", "0")
    assert not wants_compile(parse(["bench"])) and wants_compile(parse(["generate", "x", "--compile", "on"]))
    monkeypatch.setenv("GEMMAKIT_COMPILE", "maybe")
    with pytest.raises(ValueError, match="on, off or auto"):
        wants_compile(parse(["generate", "x"]))
