"""Data: COCO-format datasets, the synthetic demo set, box-aware transforms and batching."""
