"""Data: tokenizers, the TFDS/ArrayRecord dataset builder, the deterministic batch loader, the embedded corpus."""
