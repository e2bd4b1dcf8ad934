"""reso-hf."""
