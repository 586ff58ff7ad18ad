"""Datasets for training and evaluating UniME (synthetic and real)."""
