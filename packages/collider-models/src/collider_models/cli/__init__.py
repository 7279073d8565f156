"""Command-line tools: ``collider-train`` (the main job) and ``collider-bench``."""
