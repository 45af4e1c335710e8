"""The drawn demo world: its images and captions, its attribute classifier, the training of its models."""
