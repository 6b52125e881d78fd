"""Time from starting `gemmakit chat` to its prompt being ready, on the embedded default model.

The chat runs on a pseudo-terminal, as when a person starts it; the clock stops when the `>>> ` prompt
appears. The first run after installation also joins the model file and converts the tokenizer (cold); later
runs find both cached (warm). Run: .venv/bin/python benchmarks/chat_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import pty
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gemmakit.files import cache_dir


def time_to_prompt(env: dict[str, str]) -> float:
    master, slave = pty.openpty()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gemmakit.cli", "chat"], stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True)
    os.close(slave)
    seen = b""
    try:
        while b">>> " not in seen:
            if select.select([master], [], [], 120)[0] == []:
                sys.exit(f"no prompt after 120 s; output so far: {seen!r}")
            seen += os.read(master, 4096)
        return time.perf_counter() - t0
    finally:
        os.write(master, b"/exit\n")
        proc.wait(timeout=30)
        os.close(master)


def share_kernels(cold: Path) -> None:
    """Only the tokenizer's cache is cold: the C++ kernels (built once per machine) stay where they are."""
    kernels = cache_dir("kernels")
    kernels.mkdir(parents=True, exist_ok=True)  # a dangling link would stop their build
    (cold / "kernels").symlink_to(kernels, target_is_directory=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    time_to_prompt(dict(os.environ))  # the model file is joined and the page cache warm for both
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as empty_cache:
            share_kernels(Path(empty_cache))
            cold.append(time_to_prompt({**os.environ, "GEMMAKIT_CACHE_DIR": empty_cache}))
        warm.append(time_to_prompt(dict(os.environ)))
    print(f"`gemmakit chat` start -> prompt ready, {os.cpu_count()} CPUs, median of {args.repeats}")
    print(f"  warm tokenizer cache: {statistics.median(warm):.2f} s   (runs: {', '.join(f'{t:.2f}' for t in warm)})")
    print(f"  cold tokenizer cache: {statistics.median(cold):.2f} s   (runs: {', '.join(f'{t:.2f}' for t in cold)})")


if __name__ == "__main__":
    main()
