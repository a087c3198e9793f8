"""Evaluating generators: sampling prompt sets, oracle accuracy by tag, image grids."""
