"""HTTP router, command line and per-role entry points."""
