"""What a training run trains on, and the check that a re-submitted run resumes only the same training.

In:  the config and the resolved model (and, for `latest_checkpoint`, the run folder). Out:
     * `trained_on(cfg, resolved)` → {dotted key: value} of every setting that changes what is trained;
     * `fingerprint(cfg, resolved)` → the part of it the training shards depend on (pipeline/train/shards.py
       reuses shards only when it matches);
     * `check_resume(saved, want, mode=…)` → nothing, a one-line `FluidError` naming the keys that
       differ (`train.resume=auto`), or a warning with them (`force`);
     * `latest_checkpoint(run)` → (folder, saved trainer state) of the checkpoint a re-submission resumes.
No Ray: the driver runs these before any worker starts.
"""

from __future__ import annotations

import json
import sys

from pipeline.errors import FluidError

# Settings a re-submitted run may change: where and how it runs, how long, what it evaluates and where it
# exports. Every other data/noise/model/train setting changes what is trained (`trained_on`): a resume
# compares them with the checkpoint's (`check_resume`), and reused shards with the shards' own.
RESUBMIT_MAY_CHANGE = frozenset({
    "model.cache_dir", "data.tokenizer_actors",
    "train.workers", "train.use_gpu", "train.cpus_per_worker", "train.max_failures", "train.fail_at_step",
    "train.max_steps", "train.time_budget_s", "train.checkpoint_every", "train.keep_checkpoints",
    "train.storage_path", "train.run_name", "train.export_dir", "train.verbose", "train.resume", "train.tracking",
    "train.activation_checkpointing",  # recomputes the same activations: memory, not maths
    "train.eval_batches", "train.eval_decode_prompts", "train.eval_decode_tokens", "train.eval_decode_prompt_len",
})
# Settings that decide in which order the reader takes the shards' rows, not what the shards hold.
_READ_ONLY_KEYS = frozenset({"data.preprocessed", "data.preprocessed_sha256", "data.shuffle", "data.seed",
                             "data.shuffle_buffer"})
_SECTIONS = ("model", "data", "noise", "train")


def trained_on(cfg, resolved) -> dict:
    """{dotted key: value} of everything that decides what a run trains: the data, noise, model and train
    settings less `RESUBMIT_MAY_CHANGE`, the model's sha256 and `[M]` id, and `data.preprocessed` /
    `data.distilled` as the sha256 of their shards' content (a folder's path may change, its rows not)."""
    from pipeline.sources.staging import content_manifest

    out = {f"{section}.{k}": v for section in _SECTIONS for k, v in getattr(cfg, section).__dict__.items()}
    for key in ("data.preprocessed", "data.distilled"):
        if out.pop(key):
            out[f"{key}_sha256"] = content_manifest(getattr(cfg.data, key.split(".")[1]))["sha256"]
    out.update({"model.sha256": resolved.meta.get("sha256"), "model.mask_token_id": resolved.mask_token_id})
    return {k: v for k, v in sorted(out.items()) if k not in RESUBMIT_MAY_CHANGE}


def fingerprint(cfg, resolved) -> dict:
    """What the training shards `prepare_train_shards` writes hold: `trained_on` less the train section and
    the reader's order settings."""
    return {k: v for k, v in trained_on(cfg, resolved).items()
            if not k.startswith("train.") and k not in _READ_ONLY_KEYS}


def changed_keys(have: dict, want: dict) -> list[str]:
    """The keys whose values differ between two fingerprints (missing on one side counts)."""
    return sorted(k for k in have.keys() | want.keys() if have.get(k, "<unset>") != want.get(k, "<unset>"))


def check_resume(saved: dict | None, want: dict, *, mode: str, checkpoint: str) -> None:
    """Before a re-submitted run resumes from `checkpoint`: its saved `trained_on` must equal `want`.
    A difference is a one-line error naming the keys (`train.resume=auto`), or a warning (`force`)."""
    if saved is None:
        print(f"[fluid] warning: {checkpoint} records no settings to compare (written before resume checks); "
              "resuming as asked", file=sys.stderr, flush=True)
        return
    keys = changed_keys(saved, want)
    if not keys:
        return
    listed = ", ".join(f"{k} ({saved.get(k, '<unset>')!r} -> {want.get(k, '<unset>')!r})" for k in keys)
    if mode == "force":
        print(f"[fluid] warning: train.resume=force: resuming {checkpoint} although these settings changed: "
              f"{listed}", file=sys.stderr, flush=True)
        return
    raise FluidError(f"cannot resume {checkpoint}: settings that change what is trained differ from the "
                     f"checkpoint's: {listed}; use a new train.run_name, or train.resume=force")


def latest_checkpoint(run: str) -> tuple[str, dict] | None:
    """(folder, saved trainer state) of the run's checkpoint with the highest step, or None: the one a
    re-submitted Ray Train run resumes from."""
    from pipeline.sources.staging import _fs, join
    from pipeline.train.checkpoint import STATE_FILE

    fs, root = _fs(run)
    if not fs.isdir(root):
        return None
    found = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        state = join(entry, STATE_FILE)
        if name.startswith("checkpoint_") and fs.exists(state):
            found.append((json.loads(fs.cat_file(state)).get("step", 0), name, state))
    if not found:
        return None
    step, name, state = max(found)
    return join(run, name), json.loads(fs.cat_file(state))
