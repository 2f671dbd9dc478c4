"""Decisions only: placement and offload policy over plain data."""
