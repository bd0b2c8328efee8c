"""`fluid info`: fetch (or find in the cache) the model and corpus of a config and describe them.

Resolves the model (built-in SmolLM2-135M by default: download, sha256 check, GGUF dequantization,
`[M]` added), fetches the corpus, tokenizes every document and prints model size, vocabulary and
per-split corpus statistics. A quick check of a config's inputs before a long run; the main job
that uses them is `fluid demo` (`make demo`).
"""

from __future__ import annotations

import argparse
import sys
import time

from jobs.common import parse_job_args, run_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-tokenize", action="store_true", help="count characters only (faster)")
    args, cfg = parse_job_args(parser, argv)

    from pipeline.sources.corpus import RecordStats, iter_documents, list_sources
    from pipeline.sources.model_source import resolve_model

    t0 = time.time()
    resolved = resolve_model(cfg.model.spec, cfg.model.cache_dir, mask_token=cfg.model.mask_token)
    t_model = time.time() - t0
    from transformers import AutoConfig, AutoTokenizer

    mcfg = AutoConfig.from_pretrained(resolved.path)
    tok = AutoTokenizer.from_pretrained(resolved.path)
    n_params = _count_params(resolved.path)
    print(f"model     {cfg.model.spec} → {resolved.path}  ({t_model:.1f} s)")
    print(f"          {mcfg.model_type}, {getattr(mcfg, 'num_hidden_layers', '?')} layers, hidden "
          f"{getattr(mcfg, 'hidden_size', '?')}, {n_params / 1e6:.1f} M parameters, context "
          f"{getattr(mcfg, 'max_position_embeddings', '?')}")
    print(f"          vocab {mcfg.vocab_size} (tokenizer {len(tok)} with {cfg.model.mask_token!r} = id "
          f"{resolved.mask_token_id}), eos {tok.eos_token!r} = id {tok.eos_token_id}")

    t1 = time.time()
    sources = list_sources(cfg.data.corpus, cache_dir=cfg.model.cache_dir, val_fraction=cfg.data.val_fraction,
                           test_fraction=cfg.data.test_fraction, split_seed=cfg.data.split_seed)
    stats = RecordStats()
    per_split: dict[str, list[int]] = {}
    for doc in iter_documents(sources, text_field=cfg.data.text_field, text_column=cfg.data.text_column,
                              max_doc_chars=cfg.data.max_doc_chars, val_fraction=cfg.data.val_fraction,
                              test_fraction=cfg.data.test_fraction, split_seed=cfg.data.split_seed, stats=stats):
        n_tok = 0 if args.no_tokenize else len(tok(doc.text, add_special_tokens=False).input_ids)
        row = per_split.setdefault(doc.split, [0, 0, 0])
        row[0] += 1
        row[1] += len(doc.text)
        row[2] += n_tok
    print(f"corpus    {', '.join(cfg.data.corpus)}: {len(sources)} files  ({time.time() - t1:.1f} s)")
    print(f"          {'split':<11}{'documents':>10}{'characters':>13}{'tokens':>12}")
    for split in ("train", "validation", "test"):
        d, c, n = per_split.get(split, [0, 0, 0])
        print(f"          {split:<11}{d:>10}{c:>13,}{n:>12,}")
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(stats.skipped.items())) or "none"
    print(f"          records read {stats.read}, kept {stats.kept}, skipped: {skipped}; "
          f"long documents cut into {stats.split_pieces} extra pieces")
    if stats.kept == 0:
        print("error: the corpus has no usable documents", file=sys.stderr)
        return 2
    return 0


def _count_params(path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                shape = sf.get_slice(key).get_shape()
                n = 1
                for s in shape:
                    n *= s
                total += n
    return total


if __name__ == "__main__":
    sys.exit(run_job(main))
