"""The package version (a leaf: anything may import it without importing the package's façade)."""

__version__ = "0.1.0"
