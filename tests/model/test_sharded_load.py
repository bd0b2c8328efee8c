"""Sharded model load (2 gloo ranks): the same weights as a full load, and no rank reads more than one
layer's worth of parameters at a time (it reads only its own shard of each parameter)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import make_tiny_llama

WORLD, VOCAB, LAYERS = 2, 60, 4


def _worker(rank, port, root, mask_id, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        from pipeline.model import sharded_load

        res = {}
        for tied in (True, False):
            sharded_load.READ_LOG.clear()
            model = sharded_load.load_sharded(f"{root}/{tied}", mask_id, torch.device("cpu"))
            res[tied] = {"full": {n: p.full_tensor().clone() for n, p in model.named_parameters()},
                         "reads": list(sharded_load.READ_LOG)}
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def test_sharded_load_matches_full_load_and_reads_one_shard_at_a_time(tmp_path):
    from pipeline.model.causal_lm import add_mask_token, load_causal_lm

    for tied in (True, False):
        make_tiny_llama(VOCAB, num_hidden_layers=LAYERS, tie_word_embeddings=tied).save_pretrained(tmp_path / str(tied))
    mask_id = VOCAB  # a new row: the embeddings are resized, the row is the mean of the others
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(port, str(tmp_path), mask_id, str(tmp_path / "out.pt")), nprocs=WORLD, join=True)
    out = torch.load(tmp_path / "out.pt")
    for tied in (True, False):
        res = out[tied]
        reference = add_mask_token(load_causal_lm(tmp_path / str(tied)), mask_id)
        want = dict(reference.named_parameters())
        assert res["full"].keys() == want.keys()
        assert ("lm_head.weight" in want) is not tied
        for name, value in want.items():
            torch.testing.assert_close(res["full"][name], value.detach(), rtol=0, atol=1e-7, msg=name)
        layer = sum(p.numel() for p in reference.model.layers[0].parameters())
        total = sum(p.numel() for p in reference.parameters())
        sizes = [torch.Size(shape).numel() for _, shape in res["reads"]]
        assert max(sizes) <= layer  # never more than one layer's worth in one read …
        assert sum(sizes) <= total // WORLD + VOCAB * 32  # … and only this rank's shards (± one row per table)
