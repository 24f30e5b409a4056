"""Torch building blocks. Nothing here knows about AnnData."""
