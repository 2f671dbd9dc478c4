"""Attention backends behind one interface, and (later) the attention executor role."""
