"""Flower ClientApp(s)."""
