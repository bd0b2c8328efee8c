"""Quiet logs (pipeline/logs.py), counted on a small adapt job driven as the demo drives it: its own local Ray
instance without the dashboard (so Ray Train's placement-group cleaner cannot reach the State API), then
`fluid adapt` in the same process. At the default verbosity each `[fluid]` line appears once and Ray's
harmless chatter not at all, while a failing worker's traceback still shows; `--train.verbose=true` brings
Ray's lines back."""

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]

# the demo's order: parse the config (train.verbose), start Ray without the dashboard, run the job's main
DRIVER = """
import argparse, sys
from jobs.adapt import main
from jobs.common import parse_job_args
from pipeline.data.ray_pipeline import init_ray
parse_job_args(argparse.ArgumentParser(), sys.argv[1:])
init_ray(num_cpus=4, include_dashboard=False)
sys.exit(main(sys.argv[1:]))
"""

# Ray's own lines, each harmless: what the default verbosity leaves out
CHATTER = {
    "placement-group cleaner": re.compile(r"PlacementGroupCleaner|Failed to query Ray Train Controller"),
    "Ray Data progress": re.compile(r"Running Dataset|Total Progress|Execution plan of Dataset"),
    "Ray Train INFO": re.compile(r"Started training worker group|Requesting resources"),
}
WORKER_PREFIX = re.compile(r"^(\x1b\[\d+m)?\([^)]*\)(\x1b\[0m)? ?")  # "(RayTrainWorker pid=…) "


def _job(tmp_path, *overrides) -> list[str]:
    from tests.conftest import WORDS, make_tiny_llama, make_tiny_tokenizer

    model, corpus = tmp_path / "model", tmp_path / "corpus"
    if not model.exists():
        tok = make_tiny_tokenizer()
        make_tiny_llama(len(tok)).save_pretrained(model)
        tok.save_pretrained(model)
        corpus.mkdir()
        for i in range(12):
            words = [WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(20 + 3 * i)]
            (corpus / f"doc{i:02d}.txt").write_text(" ".join(words))
    args = [f"--model.spec={model}", f"--data.corpus={corpus}", "--data.seq_len=16", "--noise.k_max=4",
            "--train.global_batch_size=4", "--train.max_steps=4", "--train.checkpoint_every=1",
            "--train.warmup_steps=1", "--train.cpus_per_worker=1", "--train.eval_batches=1",
            "--train.eval_decode_prompts=0", "--data.val_fraction=0.2", "--data.test_fraction=0.1",
            f"--train.storage_path={tmp_path / 'runs'}", *overrides]
    proc = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout.splitlines()


def _fluid_lines(lines: list[str]) -> list[str]:
    return [WORKER_PREFIX.sub("", x) for x in lines if "[fluid]" in x]


def test_default_logs_are_quiet_and_verbose_brings_ray_back(tmp_path):
    # a worker fails once at step 2 and the run resumes from step 1's checkpoint: a real error must show
    quiet = _job(tmp_path, "--train.run_name=quiet", "--train.fail_at_step=2", "--train.max_failures=1")
    fluid = _fluid_lines(quiet)
    repeated = {line: n for line, n in Counter(fluid).items() if n > 1}
    assert not repeated, repeated
    assert any("[fluid] eval at step 4" in x for x in fluid) and any("[fluid] data:" in x for x in fluid)
    for name, pattern in CHATTER.items():
        assert not [x for x in quiet if pattern.search(x)], f"{name} at the default verbosity:\n" + "\n".join(quiet)
    assert any("RuntimeError: injected failure at step 2" in x for x in quiet), "\n".join(quiet)
    assert len(quiet) <= 40, "\n".join(quiet)  # 24 on Ray 2.60: [fluid] lines, the traceback, 2 core_worker notes

    # verbose: the same job's Ray lines come back (the shards the quiet run wrote are reused)
    loud = _job(tmp_path, "--train.run_name=loud", "--train.verbose=true",
                f"--data.preprocessed={tmp_path / 'runs' / 'quiet' / 'data' / 'train'}")
    back = {name for name, pattern in CHATTER.items() if any(pattern.search(x) for x in loud)}
    assert back == set(CHATTER), (set(CHATTER) - back, "\n".join(loud))
    assert not {line for line, n in Counter(_fluid_lines(loud)).items() if n > 1}
