"""WALS trainer pipeline package."""
