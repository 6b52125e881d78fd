"""`gemmakit finetune`: supervised fine-tuning and DPO, as full fine-tuning, LoRA or QLoRA, on one process or
many (torchrun + FSDP2), on the same model code that serves inference.

A run, in order: load the model and tokenizer; read the data (bad records reported and skipped, a validation
share held out); adapt the model (LoRA layers, a quantized base, or everything trainable); shard it when
distributed; then loop over optimizer steps. A step is a global batch of `batch_size x grad_accum x ranks`
sequences; its loss is the sum over scored tokens (or DPO pairs) divided by their count in the whole global
batch, so accumulation and data parallelism give exactly the gradient of one large batch (the FSDP test holds
single- and two-process loss curves together). AdamW with linear warmup and a cosine decay; gradient
clipping; bf16 autocast where the device has it; activation checkpointing per decoder layer.

On a multimodal checkpoint, chat records may hold images and audio (train/media_records.py): the towers encode
them once while the data is read and stay frozen; LoRA adapts the decoder only, and the adapter is saved under
the names PEFT gives the HF multimodal class. Full fine-tuning of such a checkpoint is refused: its export
(checkpoints/export.py) writes the text model alone, and the towers would be lost.

Nothing is lost: checkpoints every `save_every` steps (train/state.py, atomic), Ctrl-C or SIGTERM finishes
the current step, saves and exits, and `resume` continues from the newest checkpoint with the same data order,
RNG and optimizer state, so the loss curve continues as if never stopped. Outputs land in `out/`: the adapter
(PEFT format) or the model (HF directory), metrics.jsonl, loss.png, config.yaml.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from tqdm import tqdm

from gemmakit.chat.template import THOUGHT_CLOSE, THOUGHT_OPEN
from gemmakit.checkpoints.common import CheckpointError
from gemmakit.files import recover, swap_dir, write_text_atomic
from gemmakit.train import distributed as D
from gemmakit.train.data import Dataset, Example, collate, load_dataset, split, step_batches
from gemmakit.train.lora import LoRALinear, add_lora, save_adapter, target_linears
from gemmakit.train.media_records import RecordMedia, rows_media
from gemmakit.train.objectives import dpo_loss, sequence_logps, sft_loss
from gemmakit.train.recipe import TrainConfig
from gemmakit.train.report import MetricsLog, plot_losses
from gemmakit.train.state import checkpoints, full_state, resume, save_checkpoint, tidy, trainable_state


@dataclass
class Result:
    out: Path
    steps: int
    final: Path | None  # the adapter or model directory (None if the run was interrupted)
    val_loss: float | None
    interrupted: bool = False


def lr_at(step: int, c: TrainConfig, total: int) -> float:
    """Linear warmup to c.lr, then a cosine to c.lr * c.min_lr_ratio at the last step."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = (step - c.warmup_steps) / max(1, total - c.warmup_steps)
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """The base model's outputs from a LoRA model (DPO's reference without a second copy)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


class _StopRequest:
    """The first Ctrl-C / SIGTERM asks the loop to save and stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (press Ctrl-C again to abort)", file=sys.stderr)

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, config: TrainConfig, progress: bool = True, device: str | None = None):
        config.check()
        self.c, self.progress = config, progress
        self.world = D.setup(device)
        self.out = Path(config.out)
        torch.manual_seed(config.seed)  # the same LoRA initialisation on every rank
        self._load_model()
        self._load_data()
        self._adapt()
        D.shard(self.model, self.world)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.unit = 2 if self.dpo else 1
        self.per_step = config.batch_size * config.grad_accum * self.world.size
        groups = len(self.train.examples) // self.unit
        self.steps_per_epoch = math.ceil(groups / max(1, self.per_step // self.unit))
        self.total_steps = config.max_steps or math.ceil(config.epochs * self.steps_per_epoch)
        cuda = self.world.device.type == "cuda"
        bf16 = config.precision == "bf16" or (config.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
        self.autocast = torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=bf16)
        self._epoch_cache: tuple[int, list[list[Example]]] | None = None
        self.saved_step = -1

    # --- set-up ------------------------------------------------------------------------------
    def _load_model(self) -> None:
        from gemmakit.api import pick_chat_format
        from gemmakit.chat.dialogue import render_dialogue
        from gemmakit.checkpoints import load_model_and_tokenizer, resolve

        path = resolve(self.c.model)
        self.model, self.tokenizer = load_model_and_tokenizer(path, torch.float32, self.world.device)
        name = self.model.config.name if path.suffix == ".gguf" else path.name
        fmt = pick_chat_format(f"{name} {path.stem}", self.model.config.family, self.tokenizer, self.c.chat_format)
        self.chat_format = "dialogue" if fmt is None else ("template" if fmt.template else fmt.family)
        self.media = RecordMedia(self.model, _media_refusal(self.model, fmt), self.c.max_soft_tokens)
        self.thought = None
        if fmt is None:
            self.render = lambda messages, gen, think: render_dialogue(messages, add_generation_prompt=gen)
        else:
            self.render = lambda messages, gen, think: fmt.render(messages, add_generation_prompt=gen,
                                                                  enable_thinking=think)
            if fmt.family == "gemma4":
                self.thought = lambda text: f"{THOUGHT_OPEN}{text}{THOUGHT_CLOSE}"
        self.base_name = str(self.c.model or name)

    def _load_data(self) -> None:
        c = self.c
        self.model.eval()  # the towers encode the records' media now, as at inference
        data = load_dataset(c.data, self.tokenizer, self.render, c.max_length, c.format, self.thought, self.media)
        if c.val_data:
            self.train = data
            self.val = load_dataset(c.val_data, self.tokenizer, self.render, c.max_length, c.format, self.thought,
                                    self.media)
            data.problems += self.val.problems
        else:
            self.train, self.val = split(data, c.val_fraction, c.seed)
        self.problems = data.problems
        self.dpo = c.objective == "dpo" or (c.objective == "auto" and data.pairs)
        if self.dpo != data.pairs:
            raise ValueError("DPO needs preference records (prompt, chosen, rejected)" if self.dpo else
                             "preference records train with DPO: set objective to dpo or auto")
        if self.dpo and c.batch_size % 2:
            raise ValueError(f"DPO batches hold whole pairs: batch_size must be even, not {c.batch_size}")

    def _adapt(self) -> None:
        c, model = self.c, self.model
        if c.method == "full":
            if model.config.media_type is not None:
                raise ValueError(f"full fine-tuning of a multimodal checkpoint ({model.config.name}) is not "
                                 "supported: the written model would lose its towers; use --method lora or qlora")
            model.requires_grad_(True)
        else:
            if c.method == "qlora":
                from gemmakit.train.qlora import quantize_targets

                quantize_targets(model, target_linears(model, c.lora_targets), c.qlora_bits)
            add_lora(model, c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_targets)
        if self.dpo and c.dpo_reference == "live" and c.method == "full":
            raise ValueError("a live DPO reference needs LoRA (the base is the adapters switched off); "
                             "with full fine-tuning use dpo_reference: cache")
        model.activation_checkpointing = c.activation_checkpointing
        model.train()

    # --- steps -------------------------------------------------------------------------------
    def epoch_steps(self, epoch: int) -> list[list[Example]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, step_batches(self.train, self.per_step, self.c.seed, epoch))
        return self._epoch_cache[1]

    def micro_batches(self, step: list[Example]) -> list[tuple[list[Example], float]]:
        """This rank's share of a global step, as exactly grad_accum micro-batches (see distributed.py)."""
        groups = [step[i:i + self.unit] for i in range(0, len(step), self.unit)]
        mine = groups[self.world.rank::self.world.size]
        per = math.ceil(len(mine) / self.c.grad_accum)
        chunks = [[e for g in mine[i * per:(i + 1) * per] for e in g] for i in range(self.c.grad_accum)]
        return [(chunk, 1.0) if chunk else (step[:self.unit], 0.0) for chunk in chunks]

    def batch(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Right-padded ids and labels on the device, and the rows' soft tokens (None without media)."""
        ids, labels = (t.to(self.world.device) for t in collate(examples, self.tokenizer.pad_id))
        return ids, labels, rows_media(examples, ids.shape, self.model.config.bidirectional_kinds, ids.device)

    def losses(self, examples: list[Example]) -> tuple[torch.Tensor, list[float]]:
        """(summed loss, [loss sum, count, margin sum, correct pairs, tokens]) of one micro-batch."""
        ids, labels, media = self.batch(examples)
        tokens = float(sum(len(e.ids) for e in examples))
        with self.autocast:
            if not self.dpo:
                loss, n = sft_loss(self.model, ids, labels, media)
                return loss, [loss.item(), float(n), 0.0, 0.0, tokens]
            policy = sequence_logps(self.model, ids, labels, media)
            if self.c.dpo_reference == "live":
                with torch.no_grad(), adapters_off(self.model):
                    reference = sequence_logps(self.model, ids, labels, media)
            else:
                reference = torch.tensor([e.reference for e in examples], device=policy.device)
        per_pair, margin = dpo_loss(policy, reference, self.c.dpo_beta)
        loss = per_pair.sum()
        return loss, [loss.item(), float(len(per_pair)), float(margin.sum()), float((margin > 0).sum()), tokens]

    def train_step(self, step: int, examples: list[Example]) -> dict[str, float]:
        t0 = time.perf_counter()
        lr = lr_at(step, self.c, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        denom = len(examples) // 2 if self.dpo else sum(e.scored for e in examples)
        stats = [0.0] * 5
        for chunk, weight in self.micro_batches(examples):
            loss, parts = self.losses(chunk)
            (loss * (weight * self.world.size / denom)).backward()
            stats = [s + p * weight for s, p in zip(stats, parts, strict=True)]
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.c.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total, count, margin, correct, tokens = D.all_sum(stats, self.world)
        record = {"step": step + 1, "epoch": round((step + 1) / self.steps_per_epoch, 4), "loss": total / count,
                  "lr": lr, "grad_norm": D.full_norm(norm), "tokens": tokens,
                  "tokens_per_s": tokens / (time.perf_counter() - t0)}
        if self.dpo:
            record.update(margin=margin / count, accuracy=correct / count)
        return record

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> dict[str, float]:
        """Validation loss (and DPO margin/accuracy) over `data`, split across ranks like training."""
        if not data.examples:
            return {}
        self.model.eval()
        stats = [0.0] * 5
        for start in range(0, len(data.examples), self.per_step):
            for chunk, weight in self.micro_batches(data.examples[start:start + self.per_step]):
                _, parts = self.losses(chunk)
                stats = [s + p * weight for s, p in zip(stats, parts, strict=True)]
        self.model.train()
        total, count, margin, correct, _ = D.all_sum(stats, self.world)
        out = {"val_loss": total / count}
        if self.dpo:
            out.update(val_margin=margin / count, val_accuracy=correct / count)
        return out

    @torch.no_grad()
    def cache_reference(self) -> None:
        """DPO with a cached reference: every answer's log-likelihood under the starting model, computed once
        and kept in out/reference_logps.json (a resumed run reads it back: its model has moved on)."""
        path = self.out / "reference_logps.json"
        examples = self.train.examples + self.val.examples
        if path.exists():
            values = json.loads(path.read_text())
        else:
            self.model.eval()
            values = []
            bar = tqdm(total=len(examples), desc="reference log-probs", disable=not self._bar_on(), leave=False)
            for start in range(0, len(examples), self.c.batch_size):
                chunk = examples[start:start + self.c.batch_size]
                ids, labels, media = self.batch(chunk)
                with self.autocast:
                    values += sequence_logps(self.model, ids, labels, media).tolist()
                bar.update(len(chunk))
            bar.close()
            self.model.train()
            self._on_main(lambda: write_text_atomic(path, json.dumps(values)), path)
        if len(values) != len(examples):
            raise ValueError(f"{path} does not match the data ({len(values)} vs {len(examples)} answers): "
                             "delete it, or resume with the data the run started with")
        for e, v in zip(examples, values, strict=True):
            e.reference = v

    def _bar_on(self) -> bool:
        return self.progress and self.world.main

    # --- the run -----------------------------------------------------------------------------
    def _start(self) -> int:
        """Prepare out/ and return the step to start from (0, or the newest usable checkpoint's on resume)."""
        if self.world.main:  # what a run killed while saving left behind (never a finished checkpoint)
            tidy(self.out)
            for name in ("adapter", "model"):
                recover(self.out / name)
        D.barrier(self.world)
        found = checkpoints(self.out)
        if found and not self.c.resume:
            raise ValueError(f"{self.out} already holds a run (checkpoints in {self.out / 'checkpoints'}): pass "
                             "--resume to continue it, or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        D.barrier(self.world)
        start = 0
        resumed = resume(self.out, self.model, self.optimizer) if found else None
        if resumed:
            path, info, skipped = resumed
            start = self.saved_step = int(info["step"])
            if self.world.main:
                for why in skipped:
                    print(f"skipping a newer checkpoint: {why}", file=sys.stderr)
                print(f"resuming from {path} (step {start} of {self.total_steps})", file=sys.stderr)
        else:
            config = yaml.safe_dump(self.c.to_dict(), sort_keys=False)
            self._on_main(lambda: write_text_atomic(self.out / "config.yaml", config), self.out / "config.yaml")
        if self.problems:  # every rank read the same data
            problems = self.out / "data_problems.txt"
            self._on_main(lambda: write_text_atomic(problems, "\n".join(self.problems) + "\n"), problems)
        if self.world.main and self.problems:
            shown = "\n  ".join(self.problems[:10])
            more = f"\n  ... and {len(self.problems) - 10} more" if len(self.problems) > 10 else ""
            print(f"skipped {len(self.problems)} bad records (all in {self.out / 'data_problems.txt'}):\n  "
                  f"{shown}{more}", file=sys.stderr)
        return start

    def _on_main(self, write: Callable[[], object], what: Path | str) -> None:
        """Make a write that only rank 0 makes (collective when distributed). Its failure (a full disk) is
        every rank's: all raise the same CheckpointError, rather than the others running on to a collective
        that rank 0 never reaches."""
        error = None
        if self.world.main:
            try:
                write()
            except OSError as e:
                error = (f"could not write {what} ({type(e).__name__}: {e}): free space on that disk (or move "
                         "--out) and run again with --resume")
        error = D.shared_error(error)
        if error is not None:
            raise CheckpointError(error)

    def save(self, step: int) -> Path:
        self.saved_step = step
        info = {"epoch": step / self.steps_per_epoch, "config": self.c.to_dict()}
        return save_checkpoint(self.out, step, self.model, self.optimizer, info, self.c.keep_checkpoints,
                               write=self.world.main)

    def run(self) -> Result:
        start = self._start()
        if self.dpo and self.c.dpo_reference == "cache":
            self.cache_reference()
        log = MetricsLog(self.out / "metrics.jsonl", self.out / "tensorboard" if self.c.tensorboard else None)
        self._on_main(lambda: log.truncate(start), log.path)
        if start == 0 and self.val.examples:  # the starting point of the validation curve
            baseline = self.evaluate(self.val)
            self._on_main(lambda: log.write({"step": 0, **baseline}), log.path)
        bar = tqdm(total=self.total_steps, initial=start, desc="finetune", disable=not self._bar_on(),
                   unit="step", dynamic_ncols=True)
        step, stopped = start, False
        try:
            with _StopRequest() as stop:
                while step < self.total_steps and not stopped:
                    epoch, index = divmod(step, self.steps_per_epoch)
                    record = self.train_step(step, self.epoch_steps(epoch)[index])
                    step += 1
                    if self.c.eval_every and step % self.c.eval_every == 0 and step < self.total_steps:
                        record.update(self.evaluate(self.val))
                    failed = False
                    if self.world.main:
                        try:
                            log.write(record)
                        except OSError:
                            failed = True
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                    bar.update(1)
                    # one all-reduce per step for both: Ctrl-C seen by any rank, rank 0's log write failing
                    votes = D.all_sum([float(stop.requested), float(failed)], self.world)
                    if votes[1]:  # write again on rank 0 (a brief hiccup passes), else every rank stops
                        self._on_main(lambda record=record: log.write(record), log.path)
                    stopped = votes[0] > 0
                    if stopped or (self.c.save_every and step % self.c.save_every == 0):
                        self.save(step)
        finally:
            bar.close()
        return self._finish(step, stopped, log)

    def _finish(self, step: int, stopped: bool, log: MetricsLog) -> Result:
        if stopped:
            log.close()
            if self.world.main:
                print(f"interrupted: saved step {step}; continue with --resume", file=sys.stderr)
            return Result(self.out, step, None, None, interrupted=True)
        final_eval = self.evaluate(self.val)
        if final_eval:
            self._on_main(lambda: log.write({"step": step, **final_eval}), log.path)
        log.close()
        if self.saved_step != step:  # decided from memory, not the disk: every rank must agree (collective)
            self.save(step)
        final = self.write_final()
        title = f"{self.c.method} {self.base_name}"
        self._on_main(lambda: plot_losses(self.out / "metrics.jsonl", self.out / "loss.png", title),
                      self.out / "loss.png")
        return Result(self.out, step, final, final_eval.get("val_loss"))

    def write_final(self) -> Path:
        """The adapter (PEFT format) or the whole model (HF directory) in out/, swapped in atomically."""
        full = self.c.method == "full"
        state = full_state(self.model) if full else trainable_state(self.model)  # collective under FSDP
        name = "model" if full else "adapter"
        final = self.out / name
        error = None
        if self.world.main:
            try:
                self._write_final(name, state)
            except (OSError, SafetensorError) as e:
                shutil.rmtree(self.out / f".{name}.partial", ignore_errors=True)
                error = (f"could not write the {name} to {final} ({type(e).__name__}: {e}); checkpoint step "
                         f"{self.saved_step} is saved: free space on that disk (or move --out) and run again with "
                         "--resume to write it")
        error = D.shared_error(error)  # the other ranks must not wait for rank 0 at the next barrier
        if error is not None:
            raise CheckpointError(error)
        return final

    def _write_final(self, name: str, state: dict[str, torch.Tensor]) -> None:
        tmp = self.out / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        if name == "model":
            from gemmakit.checkpoints.export import export_hf
            from gemmakit.model import Gemma

            plain = Gemma(self.model.config)
            plain.load_state_dict(state)
            export_hf(plain, tmp, self.tokenizer)
        else:
            save_adapter(self.model, tmp, self.base_name, state=state)
        (tmp / "gemmakit.json").write_text(json.dumps({"chat_format": self.chat_format, "base_model": self.base_name,
                                                      "method": self.c.method}, indent=2))
        swap_dir(tmp, self.out / name)


def _media_refusal(model: torch.nn.Module, fmt: Any) -> str | None:
    """Why records with images / audio cannot train this model (None: they can)."""
    from gemmakit.media.towers import accepts

    if not accepts(model):
        return ("the record has image or audio parts, but this model is text-only: fine-tune a multimodal "
                "checkpoint (with its vision / audio tower weights), or drop the parts")
    if fmt is None:
        return ("the record has image or audio parts, but the model is prompted as a plain dialogue, which has no "
                "place for them: use an instruction-tuned checkpoint or --chat-format gemma3|gemma4")
    return None


def finetune(config: TrainConfig, progress: bool = True, device: str | None = None) -> Result:
    trainer = Trainer(config, progress, device)
    try:
        return trainer.run()
    finally:
        D.teardown(trainer.world)
