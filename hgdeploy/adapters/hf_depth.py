"""Adapters for Hugging Face depth models whose necks read intermediate layers: DPT and Depth Anything."""
