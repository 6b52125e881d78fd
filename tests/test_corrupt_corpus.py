"""Every damaged or hostile checkpoint in the generated corpus (tests/fixtures/make_corrupt_corpus.py) is refused
with a `CheckpointError` that names it, in bounded time and memory.
Run: .venv/bin/python -m pytest tests/test_corrupt_corpus.py

The loads run in one child process whose address space is capped at what it uses after loading the two valid
checkpoints plus `HEADROOM`, so an allocation sized by a declared count fails there instead of passing
unnoticed (an untouched multi-GB allocation would not show in the resident size). `SECONDS` per file is a
correctness bound (no loop over a declared 2^40 entries), not a speed target: every case takes milliseconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 5.0
HEADROOM = 1 << 30

WORKER = """
import json, resource, sys, time
from pathlib import Path
import gemmakit.checkpoints as C
root, headroom = Path(sys.argv[1]), int(sys.argv[2])
C.load_model_and_tokenizer(root / "valid.gguf"), C.load_model(root / "valid-hf")  # they load; imports, pools warm
vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, vm + headroom))
for case in json.loads((root / "manifest.json").read_text()):
    t0 = time.perf_counter()
    try:
        getattr(C, case["call"])(root / case["path"])
        outcome, message = "loaded", ""
    except C.CheckpointError as e:
        outcome, message = "refused", str(e)
    except BaseException as e:
        outcome, message = type(e).__name__, str(e)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({**case, "outcome": outcome, "message": message, "seconds": time.perf_counter() - t0,
                      "maxrss_kb": rss}), flush=True)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "make_corrupt_corpus.py"), str(out)],
                   check=True, capture_output=True)
    return out


def test_every_damaged_checkpoint_is_refused_in_bounded_time_and_memory(corpus):
    cases = json.loads((corpus / "manifest.json").read_text())
    assert len(cases) > 200
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(corpus), str(HEADROOM)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60 + SECONDS * len(cases))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == len(cases), (f"the loader never finished {cases[len(results)]['path']} (rc "
                                        f"{proc.returncode}): {err[-2000:]}")
    wrong = [f"{r['what']}: {r['outcome']} {r['message'][:200]}" for r in results if r["outcome"] != "refused"]
    assert not wrong, "\n".join(wrong)
    slow = [f"{r['what']}: {r['seconds']:.1f} s" for r in results if r["seconds"] > SECONDS]
    assert not slow, slow
    unnamed = [f"{r['what']}: {r['message']}" for r in results if Path(r["path"]).name not in r["message"]]
    assert not unnamed, "\n".join(unnamed)  # the message says which file or directory is at fault
    growth = results[-1]["maxrss_kb"] - results[0]["maxrss_kb"]
    assert growth < 256 << 10, f"peak memory grew by {growth >> 10} MiB over the corpus"
    print(f"{len(results)} cases, slowest {max(r['seconds'] for r in results):.3f} s")
