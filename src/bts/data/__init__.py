"""Data for experts and stitching: domains, tokenizer, packed sequences and mixes.

- `domains`: built-in domains (`sources/`, one module each) and user files by path; the split.
- `tokenizer`: byte-level BPE trained on the train splits, saved for transformers.
- `packing`: EOS-joined token streams cut into cached, memory-mapped [n, seq_len] arrays.
- `mixes`: mix weights (explicit, proportional, uniform, UniMax) and the step-pure sampler.
"""
