"""BraTS / IXI / phantom NIfTI into verified webdataset shards (see DESIGN.md for the shard contract)."""
