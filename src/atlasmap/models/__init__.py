"""Models: torch modules (inference / generative / loss) and their user-facing classes."""
