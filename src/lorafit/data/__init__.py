"""Data stage: glossaries, generated question/answer pairs, and training-file formats."""
