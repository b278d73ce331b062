"""Wire codecs for tensors: safetensors files and JSON nested lists (numpy only)."""
