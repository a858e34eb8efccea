"""Flower server strategies."""
