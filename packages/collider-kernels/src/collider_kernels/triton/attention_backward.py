"""Triton masked attention backward (restore-Q) over kept tokens."""
