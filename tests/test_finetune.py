"""`gemmakit finetune` on a tiny random Gemma 3 with the real 262k tokenizer: the data pipeline's loss masks
and bad-record reports, the step arithmetic (accumulation, FSDP with 2 gloo processes), QLoRA, activation
checkpointing, and the run's durability (kill -9 and Ctrl-C, then --resume). The real fine-tunes of the 270M
model are in tests/test_finetune_real.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gemmakit.checkpoints.export import export_hf
from gemmakit.config import default_layer_types
from gemmakit.model import Gemma
from gemmakit.tokenizer import Tokenizer
from gemmakit.train.data import IGNORE, load_dataset, split, step_batches
from gemmakit.train.recipe import load_config
from gemmakit.train.trainer import Trainer, finetune
from tests.helpers import tiny

ROOT = Path(__file__).resolve().parent.parent
SFT = ROOT / "recipes" / "data" / "mascot_sft.jsonl"
DPO = ROOT / "recipes" / "data" / "mascot_dpo.jsonl"


@pytest.fixture(scope="module")
def tokenizer(default_model) -> Tokenizer:
    return Tokenizer.from_gguf(default_model)


@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory) -> Path:
    """A tiny random Gemma 3 as an HF directory with the 270M's tokenizer."""
    torch.manual_seed(0)
    config = dataclasses.replace(tiny("gemma3"), vocab_size=262144, num_hidden_layers=4,
                                 layer_types=default_layer_types(4, period=2), max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tiny") / "model"
    export_hf(Gemma(config), path, tokenizer)
    return path


def settings(tiny_dir: Path, out: Path, **kw) -> dict:
    return {"model": str(tiny_dir), "data": str(SFT), "out": str(out), "chat_format": "gemma3", "max_steps": 6,
            "batch_size": 4, "lr": 1e-2, "save_every": 3, "eval_every": 3, "max_length": 256, **kw}


def _render(fmt):
    return lambda m, gen, think: fmt.render(m, add_generation_prompt=gen, enable_thinking=think)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# --- data ----------------------------------------------------------------------------------------
def test_chat_records_score_only_what_the_assistant_wrote(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    path.write_text(json.dumps({"messages": messages}) + "\n")
    from gemmakit.chat.template import ChatFormat

    fmt = ChatFormat("gemma3")
    data = load_dataset(path, tokenizer, _render(fmt))
    (example,) = data.examples
    scored = tokenizer.decode([i for i, label in zip(example.ids, example.labels, strict=True) if label != IGNORE])
    assert scored == "Hello there.<end_of_turn>\nGoodbye.<end_of_turn>\n"
    assert tokenizer.decode(example.ids) == fmt.render(messages, add_generation_prompt=False)


def test_completion_text_and_preference_records(tokenizer, tmp_path):
    def render(m, gen, think):
        return "".join(f"{x['role']}: {x['content']}\n" for x in m) + ("assistant:" if gen else "")

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "2+2=", "completion": " 4"}) + "\n")
    (ex,) = load_dataset(path, tokenizer, render).examples
    assert [tokenizer.decode([i]) for i, label in zip(ex.ids, ex.labels, strict=True) if label != IGNORE] == \
        [" ", "4", "<eos>"]
    path.write_text(json.dumps({"text": "word " * 300}) + "\n")
    windows = load_dataset(path, tokenizer, render, max_length=128).examples
    assert [len(w.ids) for w in windows][:2] == [128, 128] and all(w.ids == w.labels for w in windows)
    path.write_text(json.dumps({"prompt": "Q?", "chosen": "yes", "rejected": "no"}) + "\n")
    data = load_dataset(path, tokenizer, render)
    assert data.pairs and len(data.examples) == 2
    assert [tokenizer.decode([i for i, label in zip(e.ids, e.labels, strict=True) if label != IGNORE])
            for e in data.examples] == [" yes\n", " no\n"]


def test_bad_records_are_reported_with_line_numbers_and_skipped(tokenizer, tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"messages": [{"role": "user", "content": "a"}]}),
             json.dumps({"prompt": "x"}), json.dumps({"messages": [{"role": "wizard", "content": "a"},
                                                                   {"role": "assistant", "content": "b"}]}),
             json.dumps({"messages": [{"role": "user", "content": "a " * 400}, {"role": "assistant", "content": "b"}]}),
             json.dumps(good)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    from gemmakit.chat.template import ChatFormat

    fmt = ChatFormat("gemma3")
    data = load_dataset(path, tokenizer, _render(fmt), max_length=64)
    assert len(data.examples) == 2
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in data.problems] == ["2", "3", "4", "5", "6"]
    assert "not valid JSON" in data.problems[0] and "no assistant message" in data.problems[1]
    assert "more than max_length 64" in data.problems[4]


def test_batches_are_deterministic_bucketed_and_complete(tokenizer):
    from gemmakit.chat.template import ChatFormat

    fmt = ChatFormat("gemma3")
    data = load_dataset(SFT, tokenizer, _render(fmt))
    train, val = split(data, 0.1, seed=0)
    assert len(val.examples) == 5 and len(train.examples) + len(val.examples) == len(data.examples)
    a, b = step_batches(train, 8, seed=0, epoch=0), step_batches(train, 8, seed=0, epoch=0)
    assert a == b and a != step_batches(train, 8, seed=0, epoch=1)
    assert sorted(id(e) for s in a for e in s) == sorted(id(e) for e in train.examples)
    pairs = load_dataset(DPO, tokenizer, _render(fmt))
    for step in step_batches(pairs, 4, seed=0, epoch=0):  # chosen and rejected of one pair stay together
        assert all(step[i].ids[:8] == step[i + 1].ids[:8] for i in range(0, len(step), 2))


# --- the step ------------------------------------------------------------------------------------
def test_gradient_accumulation_equals_one_big_batch(tiny_dir, tmp_path):
    one = finetune(load_config(None, settings(tiny_dir, tmp_path / "a", batch_size=4, grad_accum=1)), progress=False)
    two = finetune(load_config(None, settings(tiny_dir, tmp_path / "b", batch_size=2, grad_accum=2)), progress=False)
    assert one.steps == two.steps == 6
    torch.testing.assert_close(losses(tmp_path / "b"), losses(tmp_path / "a"), rtol=1e-4, atol=1e-5)
    assert losses(tmp_path / "a")[-1] < losses(tmp_path / "a")[0]


def test_activation_checkpointing_keeps_gradients(tiny_dir, tmp_path):
    from gemmakit.train.objectives import sft_loss

    grads = []
    for on in (False, True):
        trainer = Trainer(load_config(None, settings(tiny_dir, tmp_path / f"ac{on}", activation_checkpointing=on)),
                          progress=False)
        from gemmakit.train.data import collate

        ids, labels = collate(trainer.train.examples[:4], 0)
        loss, _ = sft_loss(trainer.model, ids, labels)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_qlora_trains_adapters_over_a_frozen_quantized_base(tiny_dir, tmp_path):
    from gemmakit.train.qlora import QuantizedBase

    for bits in (8, 4):
        trainer = Trainer(load_config(None, settings(tiny_dir, tmp_path / f"q{bits}", method="qlora",
                                                     qlora_bits=bits, lr=2e-2)), progress=False)
        bases = [m for m in trainer.model.modules() if isinstance(m, QuantizedBase)]
        assert len(bases) == 4 * 7 and all(b.bits == bits for b in bases)
        result = trainer.run()
        assert losses(result.out)[-1] < losses(result.out)[0]
        assert (result.final / "adapter_model.safetensors").is_file()


def test_quantized_base_backward_is_the_dequantized_linear():
    from gemmakit.train.qlora import QuantizedBase

    torch.manual_seed(0)
    for bits in (8, 4):
        base = QuantizedBase(torch.nn.Linear(64, 48, bias=False), bits)
        x = torch.randn(3, 64, requires_grad=True)
        base(x).square().sum().backward()
        w = base.dequantize().requires_grad_(False)
        x2 = x.detach().clone().requires_grad_(True)
        (x2 @ w.T).square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)
        err = (w - base.dequantize(torch.float32)).abs().max()
        assert err == 0  # dequantize is deterministic


# --- durability ----------------------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gemmakit.cli", "finetune", "-q", *args]


def _flags(tiny_dir: Path, out: Path, steps: int = 24) -> list[str]:
    return ["--model", str(tiny_dir), "--data", str(SFT), "--out", str(out), "--chat-format", "gemma3",
            "--max-steps", str(steps), "--batch-size", "4", "--lr", "5e-3", "--save-every", "3", "--eval-every",
            "0", "--lora-dropout", "0.1", "--max-length", "256"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


def test_kill_9_then_resume_continues_the_same_loss_curve(tiny_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(*_flags(tiny_dir, tmp_path / "whole")), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*_flags(tiny_dir, out)), env=env, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "checkpoints" / "step-000006", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists()  # it really died mid-run
    again = subprocess.run(_cli(*_flags(tiny_dir, out)), env=env, capture_output=True, text=True)
    assert again.returncode != 0 and "--resume" in again.stderr  # a finished-or-not run is never overwritten
    done = subprocess.run(_cli(*_flags(tiny_dir, out), "--resume"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    whole, resumed = losses(tmp_path / "whole"), losses(out)
    assert len(resumed) == len(whole) == 24  # no step lost, none logged twice
    torch.testing.assert_close(resumed, whole, rtol=1e-5, atol=1e-6)  # dropout RNG and AdamW state restored


def test_ctrl_c_saves_then_resume_finishes(tiny_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(*_flags(tiny_dir, out, steps=30)), env=env, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "checkpoints" / "step-000003", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted: saved step" in err
    saved = int(err.split("interrupted: saved step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step-{saved:06d}").is_dir() and len(losses(out)) == saved
    done = subprocess.run(_cli(*_flags(tiny_dir, out, steps=30), "--resume"), env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert len(losses(out)) == 30 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_fsdp_on_two_gloo_processes_matches_one_process(tiny_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--model", str(tiny_dir), "--data", str(SFT), "--chat-format", "gemma3", "--max-steps", "6",
              "--lr", "1e-2", "--save-every", "3", "--eval-every", "3", "--max-length", "256"]
    single = subprocess.run(_cli(*common, "--out", str(tmp_path / "one"), "--batch-size", "4"), env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    fsdp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "gemmakit.cli", "finetune", "-q", *common, "--out", str(tmp_path / "two"),
                           "--batch-size", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-4, atol=1e-5)
    val = [json.loads(line).get("val_loss") for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
           if "val_loss" in line]
    assert val and all(v is not None for v in val)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()  # whole (gathered) tensors under PEFT names, not shards
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)



def _rank(rank: int, port: int, args: list[str], file_limit: int | None) -> subprocess.Popen:
    """One process of a 2-process gloo run, started as torchrun would (without its supervisor, which would
    kill the others once one fails: each rank must stop by itself). `file_limit` caps the size of any file
    this process writes (RLIMIT_FSIZE, with SIGXFSZ ignored so a write fails with EFBIG like on a full disk)."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
           "LOCAL_WORLD_SIZE": "2"}
    return subprocess.Popen(_cli(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit if file_limit else None)


@pytest.mark.parametrize(("limit", "extra", "failure"), [
    (16 << 10, [], "could not write checkpoint"),  # the first checkpoint
    (512, [], "could not write .*config.yaml"),  # the first file of the run
    (1024, ["--save-every", "0", "--max-steps", "12"], "could not write .*metrics.jsonl"),  # mid-run, a log line
])
def test_a_failed_write_on_rank_0_stops_every_rank_with_what_to_do(tiny_dir, tmp_path, limit, extra, failure):
    """Rank 0 alone writes checkpoints, logs and outputs; when its disk fills every rank stops with the same
    message (the others used to go on and wait for rank 0 at the next collective, or die on a closed gloo
    connection with no advice)."""
    import re
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--model", str(tiny_dir), "--data", str(SFT), "--chat-format", "gemma3", "--max-steps", "6",
            "--batch-size", "2", "--save-every", "3", "--eval-every", "0", "--max-length", "256",
            "--out", str(tmp_path / "run"), *extra]
    ranks = [_rank(0, port, args, file_limit=limit), _rank(1, port, args, file_limit=None)]
    errs = []
    for proc in ranks:
        try:
            errs.append(proc.communicate(timeout=300)[1])
        except subprocess.TimeoutExpired:
            for p in ranks:
                p.kill()
            pytest.fail("a rank was still running 300 s after starting: it hung after rank 0's failed save")
    for proc, err in zip(ranks, errs, strict=True):
        assert proc.returncode == 2, err[-3000:]
        assert re.search(failure, err) and "File too large" in err, err[-3000:]
        assert "free space on that disk (or move --out) and run again with --resume" in err
    folder = tmp_path / "run" / "checkpoints"
    assert not folder.exists() or not list(folder.iterdir())  # no partial checkpoint left behind


def test_resume_after_an_interrupted_final_swap(tiny_dir, tmp_path):
    """A run killed while swapping in its adapter leaves .adapter.old beside the new adapter: a later
    --resume still finishes (a rename onto the leftover used to fail every time)."""
    out = tmp_path / "run"
    finetune(load_config(None, settings(tiny_dir, out, max_steps=3, eval_every=0)), progress=False)
    (out / ".adapter.old").mkdir()
    (out / ".adapter.old" / "adapter_model.safetensors").write_bytes(b"stale")
    result = finetune(load_config(None, settings(tiny_dir, out, max_steps=6, eval_every=0, resume=True)),
                      progress=False)
    assert result.steps == 6 and result.final == out / "adapter"
    assert not (out / ".adapter.old").exists() and len(losses(out)) == 6

# --- configuration -------------------------------------------------------------------------------
def test_recipes_load_and_unknown_settings_are_refused(tmp_path):
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        assert load_config(recipe, {}).data
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x.jsonl\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown settings \\['learning_rate'\\]"):
        load_config(bad, {})
    config = load_config(ROOT / "recipes" / "lora-sft-270m.yaml", {"lr": 0.5, "max_steps": None})
    assert config.lr == 0.5  # a flag given beats the recipe; a flag not given leaves it
    with pytest.raises(ValueError, match="method must be one of"):
        load_config(None, {"data": "x", "method": "dora"})


def test_tensorboard_events_are_written(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard")
    result = finetune(load_config(None, settings(tiny_dir, tmp_path / "tb", max_steps=2, tensorboard=True)),
                      progress=False)
    assert list((result.out / "tensorboard").glob("events.out.tfevents.*"))


# --- other methods and formats -------------------------------------------------------------------
def test_full_fine_tuning_writes_a_model_transformers_loads(tiny_dir, tmp_path):
    from transformers import Gemma3ForCausalLM

    from gemmakit.checkpoints import load_model

    result = finetune(load_config(None, settings(tiny_dir, tmp_path / "full", method="full", lr=1e-3,
                                                 max_steps=3)), progress=False)
    assert result.final == tmp_path / "full" / "model" and losses(result.out)[-1] < losses(result.out)[0]
    ids = torch.tensor([[2, 9259, 1902, 563, 236743]])
    trained, start = load_model(result.final), load_model(tiny_dir)
    with torch.no_grad():
        ours, ref, before = trained(ids), Gemma3ForCausalLM.from_pretrained(result.final)(ids).logits, start(ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert (ours - before).abs().max() > 1e-2  # every weight trained, and saved


def test_dpo_with_a_live_reference_starts_at_zero_margin(tiny_dir, tmp_path):
    result = finetune(load_config(None, settings(tiny_dir, tmp_path / "dpo", data=str(DPO), objective="dpo",
                                                 dpo_reference="live", max_steps=3, val_fraction=0.25)),
                      progress=False)
    rows = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and abs(rows[0]["val_margin"]) < 1e-3  # adapters off = the policy at step 0
    assert all("margin" in r and "accuracy" in r for r in rows[1:4])
    with pytest.raises(ValueError, match="batch_size must be even"):
        Trainer(load_config(None, settings(tiny_dir, tmp_path / "odd", data=str(DPO), batch_size=3)))
    with pytest.raises(ValueError, match="live DPO reference needs LoRA"):
        Trainer(load_config(None, settings(tiny_dir, tmp_path / "f", data=str(DPO), method="full",
                                           dpo_reference="live")))


def test_gemma4_chats_with_tools_and_reasoning(tokenizer, tmp_path):
    """Gemma 4's template drops earlier thoughts, so each assistant turn becomes its own example; tool calls
    are scored, tool results are not."""
    from gemmakit.chat.template import ChatFormat

    fmt = ChatFormat("gemma4")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21 degrees."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "<|channel>thought\nbe polite<channel|>You're welcome."},
    ]
    path = tmp_path / "g4.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    from gemmakit.chat.template import THOUGHT_CLOSE, THOUGHT_OPEN

    data = load_dataset(path, tokenizer, _render(fmt), thought=lambda t: f"{THOUGHT_OPEN}{t}{THOUGHT_CLOSE}")
    assert not data.problems and len(data.examples) == 3
    assert "<|think|>" in tokenizer.decode(data.examples[0].ids)  # thinking on in the system turn
    scored = [tokenizer.decode([i for i, label in zip(e.ids, e.labels, strict=True) if label != IGNORE])
              for e in data.examples]
    text = "".join(scored)
    assert "call:get_weather" in text and "It is 21 degrees." in text and "You're welcome." in text
    assert "temp" not in text and "Weather in Paris" not in text and "Thanks" not in text
    assert scored[-1].startswith("<|channel>thought\nbe polite<channel|>You're welcome.")  # what it must write
    assert "be polite" not in "".join(scored[:-1])
    with pytest.raises(ValueError, match="g4.jsonl:1: the record has assistant reasoning, but this chat format "
                                         "has no thinking mode"):
        load_dataset(path, tokenizer, _render(ChatFormat("gemma3")))  # Gemma 3 cannot learn it: reported
