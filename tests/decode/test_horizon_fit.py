"""Stage II horizon head: oracle K*, soft targets, fitting, and the Ray Train job on a tiny export."""

import json

import pytest
import torch

from pipeline.decode.horizon_fit import fit_head, fold_normalisation, kl_loss, oracle_horizon, soft_target
from pipeline.decode.horizon_head import HorizonHead
from pipeline.decode.load import load_sampler


def test_oracle_horizon_stops_where_decoding_stops():
    ce = torch.tensor([
        [1.0, 2.0, 3.0, 9.0],   # running means 1, 1.5, 2, 3.75 → K = 4 (k = 2..4) with tau 2.8
        [3.0, 0.0, 0.0, 0.0],   # ce_2 > tau: the horizon ends there although later means recover → K = 1
        [5.0, 5.0, 5.0, 5.0],   # never → K = 1 (plain AR)
        [2.8, 2.8, 2.8, 2.8],   # equal to tau counts → K = 5
        [1.0, 5.0, 0.0, 0.0],   # running means 1, 3, 2, 1.5: over tau at K′ = 3 → K = 2
        [0.0, 0.0, 0.0, 20.0],  # the last step breaks it → K = 4
    ])
    assert oracle_horizon(ce, 2.8).tolist() == [4, 1, 1, 5, 2, 4]
    assert oracle_horizon(torch.zeros(3, 0), 2.8).tolist() == [1, 1, 1]


def test_soft_target_is_a_gaussian_peaked_at_k_star():
    q = soft_target(torch.tensor([1, 5, 16]), 16, sigma=1.0)
    assert torch.allclose(q.sum(dim=1), torch.ones(3))
    assert (q.argmax(dim=1) + 1).tolist() == [1, 5, 16]
    assert q[1, 3] == pytest.approx(q[1, 5].item())  # symmetric around K* = 5
    assert q[1, 4] / q[1, 5] == pytest.approx(torch.exp(torch.tensor(0.5)).item(), rel=1e-5)
    assert kl_loss(torch.log(q + 1e-30), q).item() == pytest.approx(0.0, abs=1e-6)  # P = Q: no divergence
    assert kl_loss(torch.zeros(3, 16), q).item() > 0.5  # uniform P is far from a peaked Q


def test_fit_head_learns_a_separable_mapping_and_reads_raw_states():
    torch.manual_seed(0)
    k_star = torch.randint(1, 9, (600,))
    features = torch.randn(600, 16) * 0.1 + 50.0  # large offset: the head must normalise
    features[:, 0] += k_star.float() * 3.0
    head, metrics = fit_head(features, k_star, k_max=8, epochs=150, seed=0)
    assert metrics["heldout_exact"] > 0.9 and metrics["train_exact"] > 0.9 and metrics["pairs"] == 600
    assert (head.predict(features) == k_star).float().mean() > 0.9  # raw features: normalisation folded in
    head2, metrics2 = fit_head(features, k_star, k_max=8, epochs=150, seed=0)
    assert metrics2 == metrics  # deterministic for a seed
    with pytest.raises(ValueError, match="no \\(hidden state, K\\*\\) pairs"):
        fit_head(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), k_max=4)


def test_fold_normalisation_matches_normalised_input():
    head = HorizonHead(6, 4)
    x = torch.randn(5, 6) * 3 + 2
    mean, std = x.mean(0), x.std(0)
    expected = head((x - mean) / std)
    fold_normalisation(head, mean, std)
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.ray
def test_fit_horizon_job_on_a_tiny_export(ray_local, tmp_path, tracking_on):
    from jobs.fit_horizon import HEAD_FILE, main
    from pipeline.decode.sampler import GenerationRequest
    from pipeline.export_format import read_fluid_meta
    from pipeline.model.causal_lm import add_mask_token
    from pipeline.train.export import export_hf
    from tests.conftest import WORDS, make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.add_special_tokens({"mask_token": "[M]"})
    model = add_mask_token(make_tiny_llama(len(tok) - 1), tok.mask_token_id)
    export = tmp_path / "export"
    export_hf(model, tok, export, fluid_meta={
        "mask_token": "[M]", "mask_token_id": tok.mask_token_id, "k_max": 4,
        "policy_defaults": {"policy": "khead", "gamma": 0.5, "max_horizon": 4},
        "base_model": {"spec": "tiny", "sha256": None}, "data_config": {}, "train_config": {}})
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(10):
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (60,), generator=g).tolist()]
        (corpus / f"d{i}.txt").write_text(" ".join(words))
    rc = main(["--export", str(export), f"--data.corpus={corpus}", "--data.seq_len=32", "--data.val_fraction=0.5",
               "--horizon.examples=8", "--horizon.spans_per_example=4", "--horizon.epochs=5",
               "--horizon.tau=100", f"--train.storage_path={tmp_path / 'runs'}"])
    assert rc == 0
    meta = read_fluid_meta(export).to_dict()
    info = meta["horizon_head"]
    assert info["file"] == HEAD_FILE and info["tau"] == 100 and info["pairs"] > 0
    assert info["mean_k_star"] == 4.0  # tau = 100 admits every full span: K* = K_max
    head = HorizonHead.load(export / HEAD_FILE)
    assert head.k_max == 4 and head.hidden_size == 32
    from mlflow.tracking import MlflowClient  # train.tracking=auto: a run in the store of the export's folder

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "fit-horizon" and run.data.params["export"] == str(export)
    assert run.data.metrics["pairs"] == info["pairs"]
    sampler = load_sampler(export)
    result = sampler.generate([GenerationRequest(prompt="the quick brown fox", max_tokens=6, policy="khead",
                                                 gamma=0.0)])[0]
    assert len(result.token_ids) == 6
    assert json.loads((export / "fluid.json").read_text())["horizon_head"]["pairs"] == info["pairs"]
