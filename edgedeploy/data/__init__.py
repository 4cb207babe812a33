"""Datasets (user layouts and built-in synthetic ones) and preprocessing shared by training, export and runtime."""
