"""Backdoor attacks on text-to-image models: BadT2I and Rickrolling, and the shipped demo variants."""
