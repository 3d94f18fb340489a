"""Corpus -> tokenized, packed WebDataset shards with a manifest, in parallel on Ray."""
