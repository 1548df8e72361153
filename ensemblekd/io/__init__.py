"""The edges: files on any fsspec URI (`io.fs`) and the Ray session (`io.ray_session`)."""
