"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

In:  a (possibly FSDP2-sharded) model, its optimizer, and a small JSON-able `extra` dict (step,
     scheduler state, data position, config fingerprint).
Out: a folder with DCP shards (`__<rank>_0.distcp`, `.metadata`) and `trainer_state.json`.

Each rank writes only its own shards, so under Ray Train every worker can save into a local
folder and report it: Ray merges the workers' files into one checkpoint folder in the run's
storage. Loading re-shards automatically (DCP), so a checkpoint written by N workers loads into M
workers, or into a single unsharded model for export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from pipeline.errors import FluidError

STATE_FILE = "trainer_state.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_checkpoint(directory: str | Path, model, optimizer, extra: dict) -> Path:
    """Collective: every rank calls it with its own (or a shared) folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))
    if _rank() == 0:
        (directory / STATE_FILE).write_text(json.dumps(extra, indent=2) + "\n")
    return directory


def read_trainer_state(directory: str | Path) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FluidError(f"{directory} is not a FLUID training checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text())


def load_checkpoint(directory: str | Path, model, optimizer) -> dict:
    """Collective: restore model and optimizer in place; returns the saved `extra` dict."""
    extra = read_trainer_state(directory)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return extra


def load_model_weights(directory: str | Path, model) -> dict:
    """Restore only the model weights (e.g. into a plain single-process model for export)."""
    extra = read_trainer_state(directory)
    model_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    state = {"model": model_sd}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    return extra
