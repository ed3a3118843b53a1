"""The two chat bots: model loading, prompts, bounded memory, loop and goodbye detection, turns."""
