"""The DETR network: backbone, positional encoding, transformer and heads."""
