"""Key maps between the CompVis layout (sau's own module names) and other layouts (diffusers, HF, OpenCLIP)."""
