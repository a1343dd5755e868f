"""Evaluation: LongBench / RULER data loading, metrics, NIAH generation, result tables."""
