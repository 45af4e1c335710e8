"""Backdoor attacks on text-to-image models: what a backdoor is (backdoor), where its training data comes from
(sources), BadT2I and Rickrolling (inject), and backdoored bundles with the shipped demo variants (shipped)."""
