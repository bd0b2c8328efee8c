"""Ray Train adaptation end to end on a tiny model: resume after re-submission,
worker-count independence (streamed shards, sharded model load)."""

import json

import numpy as np
import pytest
import torch

from pipeline.config import load_config

pytestmark = pytest.mark.ray


def _corpus(root, n_docs: int = 12):
    from tests.conftest import WORDS

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))))
    return str(root)


def _run(tmp_path, name, resolved, corpus, *overrides):
    from pipeline.train.fit import build_training_datasets, fit

    cfg = load_config(None, ["--data.seq_len=16", "--noise.k_max=4", "--train.global_batch_size=4",
                             "--train.max_steps=4", "--train.checkpoint_every=1", "--train.lr=0.01",
                             "--train.warmup_steps=1", "--train.cpus_per_worker=1", f"--train.run_name={name}",
                             f"--train.storage_path={tmp_path / 'runs'}", "--train.eval_batches=1",
                             f"--data.corpus={corpus}", "--data.val_fraction=0.2", "--data.test_fraction=0.1",
                             f"--model.spec={resolved.path}", *overrides])
    datasets = build_training_datasets(cfg, resolved)
    result = fit(cfg, resolved, str(tmp_path / "runs"), datasets)
    from safetensors.torch import load_file

    weights = load_file(f"{result['export']}/model.safetensors")
    metrics = [json.loads(line) for line in open(result["metrics_jsonl"])]
    return weights, metrics, result


@pytest.fixture(scope="module")
def tiny_resolved(tmp_path_factory):
    from pipeline.sources.model_source import resolve_model
    from tests.conftest import make_tiny_llama, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return resolve_model(str(root / "model"), root / "cache")


def test_resubmitted_run_on_two_workers_matches_uninterrupted(ray_local, tmp_path, tiny_resolved):
    corpus = _corpus(tmp_path / "corpus")
    base, base_metrics, result = _run(tmp_path, "straight", tiny_resolved, corpus)
    from pipeline.export_format import read_fluid_meta

    meta = read_fluid_meta(result["export"]).to_dict()
    assert meta["mask_token_id"] == tiny_resolved.mask_token_id and meta["k_max"] == 4
    assert meta["train_config"]["steps_done"] == 4
    # the export is for inference: HF generate must use the KV cache (training ran without it)
    assert json.loads(open(f"{result['export']}/config.json").read())["use_cache"] is True
    # on-demand export of the last (sharded DCP) checkpoint = the final export
    from safetensors.torch import load_file

    from pipeline.train.export import export_checkpoint

    again = load_file(f"{export_checkpoint(result['checkpoint'], str(tmp_path / 'from-ckpt'))}/model.safetensors")
    assert again.keys() == base.keys() and all(torch.equal(again[k], base[k]) for k in base)
    steps = [m["step"] for m in base_metrics if "event" not in m]
    assert steps == [1, 2, 3, 4]
    evals = [m for m in base_metrics if m.get("event") == "eval"]
    assert [e["step"] for e in evals] == [0, 4]
    # it trained: every weight moved, and by no more than 4 Adam steps of lr 1e-2 allow (|update| ≲ lr per
    # step); whether 4 steps on 16 examples lower the held-out loss depends on the batches drawn
    initial = load_file(tiny_resolved.path / "model.safetensors")
    moved = torch.cat([(base[k] - initial[k]).abs().flatten() for k in initial if base[k].shape == initial[k].shape])
    assert (moved > 0).float().mean() > 0.99 and 1e-3 < moved.max() <= 4 * 0.01 * 1.05, (moved.min(), moved.max())
    # each evaluation decodes held-out prompts with verify (defaults: 4 prompts x 32 tokens)
    assert all(e["val_verify_tokens"] == 4 * 32 and e["val_verify_tpf"] >= 1.0 for e in evals), evals
    assert all(0 <= m["data_wait_share"] <= 1 and m["tokens_per_s"] > 0 for m in base_metrics if "event" not in m)

    # a job that died (no retries left) and is submitted again with the same run name resumes from its
    # last checkpoint — here on two workers: the 1-worker DCP checkpoint re-shards — and a worker that
    # fails inside the re-submitted run (train.max_failures=1) is recovered from step 3's checkpoint in
    # the same run. The same global batches make the same weights up to reduction order.
    with pytest.raises(Exception, match="injected failure at step 2"):
        _run(tmp_path, "resubmitted", tiny_resolved, corpus, "--train.fail_at_step=2", "--train.max_failures=0")
    assert (tmp_path / "runs" / "resubmitted" / ".failed_at_2").read_text() == "2"  # the failure did happen
    again, again_metrics, _ = _run(tmp_path, "resubmitted", tiny_resolved, corpus, "--train.fail_at_step=3",
                                   "--train.max_failures=1", "--train.workers=2", "--train.eval_decode_prompts=3")
    assert (tmp_path / "runs" / "resubmitted" / ".failed_at_3").read_text() == "3"  # and so did the in-run one
    # 1–2 first, 3 re-submitted, 4 after the in-run recovery (metrics.jsonl keeps one copy of each step)
    assert [m["step"] for m in again_metrics if "event" not in m] == [1, 2, 3, 4]
    # the same batches give the same losses step by step (a mismatch names the first step that differs)
    losses = [m["loss"] for m in again_metrics if "event" not in m]
    assert losses == pytest.approx([m["loss"] for m in base_metrics if "event" not in m], rel=1e-4)
    for key, value in base.items():
        torch.testing.assert_close(again[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    evals = [(e["step"], e["val_verify_tokens"]) for e in again_metrics if e.get("event") == "eval"]
    assert evals == [(0, 4 * 32), (4, 3 * 32)]  # 1 worker, 4 prompts; then 2 + 1 prompts over two ranks


def test_bidirectional_baseline_with_annealing_from_scratch(ray_local, tmp_path, tiny_resolved, tracking_on):
    corpus = _corpus(tmp_path / "corpus")
    weights, metrics, result = _run(tmp_path, "bidir", tiny_resolved, corpus, "--noise.mode=bidirectional",
                                    "--train.anneal_steps=2", "--train.from_scratch=true", "--train.max_steps=3",
                                    "--train.seed=7")
    steps = [m for m in metrics if "event" not in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(m["loss"] > 0 and m["n_masked"] > 0 and m["masked_ce"] > 0 for m in steps)
    assert not any("ar_ce" in m or "draft_ce" in m for m in metrics)  # a masked-token CE is no AR CE
    evals = [m for m in metrics if m.get("event") == "eval"]
    assert len(evals) == 2 and all(e["val_masked_ce"] > 0 for e in evals)
    assert not any("val_verify_tpf" in e for e in evals)  # no causal drafts to verify in the baseline
    from tests.conftest import make_tiny_llama

    pretrained = make_tiny_llama(tiny_resolved.mask_token_id).state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.allclose(weights["model.layers.0.mlp.up_proj.weight"], pretrained, atol=0.05)  # random init
    _check_tracked(tmp_path / "runs" / "bidir", metrics, result)


def _check_tracked(run_dir, metrics, result):
    """With mlflow installed (train.tracking=auto): the driver's MLflow run got the config, rank 0's
    per-step metrics through the MetricsLog hook, the export and metrics.jsonl."""
    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED" and run.data.params["noise.mode"] == "bidirectional"
    assert run.data.tags["fluid.export"] == result["export"]
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    steps = [m for m in metrics if "event" not in m]
    assert [st for st, _ in loss] == [m["step"] for m in steps]
    assert [v for _, v in loss] == pytest.approx([m["loss"] for m in steps])
    assert len(client.get_metric_history(run.info.run_id, "val_masked_ce")) == 2
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["metrics.jsonl"]


def test_resume_checks_what_was_trained_on(ray_local, tmp_path, tiny_resolved, capfd):
    """A re-submission that changes a trained-on setting stops with a one-line error naming it; with
    train.resume=force it resumes from the checkpoint and warns with the same names."""
    from pipeline.errors import FluidError

    corpus = _corpus(tmp_path / "corpus")
    _run(tmp_path, "changed", tiny_resolved, corpus, "--train.max_steps=2")
    with pytest.raises(FluidError, match=r"cannot resume .*checkpoint_.*: .*train\.lr \(0\.01 -> 0\.02\)") as err:
        _run(tmp_path, "changed", tiny_resolved, corpus, "--train.lr=0.02")
    assert "\n" not in str(err.value) and "train.workers" not in str(err.value)
    capfd.readouterr()
    _, metrics, _ = _run(tmp_path, "changed", tiny_resolved, corpus, "--train.lr=0.02", "--train.resume=force")
    assert "train.resume=force: resuming" in capfd.readouterr().err
    assert [m["step"] for m in metrics if "event" not in m] == [1, 2, 3, 4]  # resumed at 3, not restarted


def test_trained_on_lists_what_may_change_separately(tmp_path, tiny_resolved):
    from pipeline.errors import FluidError
    from pipeline.train.resume import RESUBMIT_MAY_CHANGE, changed_keys, check_resume, fingerprint, trained_on

    shards = tmp_path / "pre"
    shards.mkdir()
    (shards / "part-0.parquet").write_bytes(b"rows")
    base = load_config(None, [f"--data.preprocessed={shards}"])
    want = trained_on(base, tiny_resolved)
    assert not RESUBMIT_MAY_CHANGE & want.keys() and "data.preprocessed" not in want
    assert {"data.preprocessed_sha256", "model.sha256", "train.lr", "train.grad_accum", "train.seed",
            "train.drafter", "train.lora_rank", "noise.k_max", "data.seed"} <= want.keys()
    # the same rows under another path are the same data; other bytes are not
    moved = tmp_path / "moved"
    shards.rename(moved)
    assert trained_on(load_config(None, [f"--data.preprocessed={moved}"]), tiny_resolved) == want
    (moved / "part-0.parquet").write_bytes(b"other rows")
    again = trained_on(load_config(None, [f"--data.preprocessed={moved}"]), tiny_resolved)
    assert changed_keys(want, again) == ["data.preprocessed_sha256"]
    relaxed = load_config(None, [f"--data.preprocessed={moved}", "--train.workers=4", "--train.max_failures=0",
                                 "--train.fail_at_step=3", "--train.eval_batches=1"])
    assert changed_keys(again, trained_on(relaxed, tiny_resolved)) == []
    check_resume(again, trained_on(relaxed, tiny_resolved), mode="auto", checkpoint="ckpt")
    grown = trained_on(load_config(None, [f"--data.preprocessed={moved}", "--train.global_batch_size=16"]),
                       tiny_resolved)
    with pytest.raises(FluidError, match=r"^cannot resume ckpt: .*train\.global_batch_size \(8 -> 16\)"):
        check_resume(again, grown, mode="auto", checkpoint="ckpt")
    check_resume(again, grown, mode="force", checkpoint="ckpt")  # warns, goes on
    # the shards' own fingerprint leaves out the train section and the reader's order settings
    shard_keys = fingerprint(relaxed, tiny_resolved)
    assert "noise.k_max" in shard_keys and "data.distill_mix" in shard_keys
    assert not any(k.startswith("train.") or k in ("data.seed", "data.shuffle") for k in shard_keys)
