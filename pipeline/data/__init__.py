"""Tokens → two-stream training examples: packing, noising, a single-process loop (`local`), and the
Ray Data pipeline (`ray_pipeline`, the only module here that imports Ray)."""
