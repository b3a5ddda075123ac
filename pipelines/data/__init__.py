"""The loader's data stage: decoding helpers (partial JPEG decode of a crop box)."""
