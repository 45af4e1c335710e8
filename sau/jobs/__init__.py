"""Job runners: a whole command's work (inputs, the method, verification, the output folder)."""
